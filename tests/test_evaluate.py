import pytest
import torch

from kdbackdoor.errors import KDBackdoorError
from kdbackdoor.evaluate import accuracy, attack_success_rate, model_metrics, predict
from conftest import PixelRuleModel, encoded_label_dataset


def set_label_pixel(value: int):
    def trigger(x):
        x = x.clone()
        x[:, 0, 0, 0] = value * 40 / 255
        return x
    return trigger


def test_accuracy_perfect_and_per_class():
    data = encoded_label_dataset()
    result = accuracy(PixelRuleModel(), data)
    assert result["acc"] == 1.0 and result["n"] == 20
    assert result["per_class"] == {"c0": 1.0, "c1": 1.0, "c2": 1.0, "c3": 1.0}


def test_accuracy_counts_mistakes_per_class():
    data = encoded_label_dataset()
    data.labels[data.labels == 3] = 2  # class-2 images now look like class 3 to the rule in half the set
    result = accuracy(PixelRuleModel(), data)
    assert result["acc"] == pytest.approx(15 / 20)
    assert result["per_class"]["c2"] == pytest.approx(0.5)
    assert "c3" not in result["per_class"]  # no test image left in class 3


def test_asr_excludes_target_class_images():
    data = encoded_label_dataset()
    result = attack_success_rate(PixelRuleModel(), data, set_label_pixel(1), target=1)
    assert result["n"] == 15  # the 5 images of the target class are excluded
    assert result["asr"] == 1.0
    assert set(result["per_source_class"]) == {"c0", "c2", "c3"}


def test_asr_partial_trigger_per_source_class():
    data = encoded_label_dataset()

    def only_class0_flips(x):  # a trigger that only fools the model on class-0 images
        x = x.clone()
        is_c0 = x[:, 0, 0, 0] == 0
        x[is_c0, 0, 0, 0] = 40 / 255
        return x

    result = attack_success_rate(PixelRuleModel(), data, only_class0_flips, target=1)
    assert result["asr"] == pytest.approx(5 / 15)
    assert result["per_source_class"] == {"c0": 1.0, "c2": 0.0, "c3": 0.0}


def test_clean_model_baseline_asr_is_zero_for_identity_trigger():
    data = encoded_label_dataset()
    assert attack_success_rate(PixelRuleModel(), data, lambda x: x, target=2)["asr"] == 0.0


def test_metrics_say_how_often_the_target_comes_without_the_trigger():
    """A model that answers the target for everything has full ASR; the rate without the trigger
    (same non-target images) shows it, where a real backdoor's is the clean error towards the target."""
    data = encoded_label_dataset()
    data.labels[:2] = 3  # two class-0 images mislabelled: the rule calls them 0, so 0 without any trigger

    class AlwaysTarget(PixelRuleModel):
        def forward(self, x):
            return torch.nn.functional.one_hot(torch.zeros(len(x), dtype=torch.long), 4).float() + 0 * self.dummy

    always = model_metrics(AlwaysTarget(), data, trigger=lambda x: x, target=0)
    assert always["asr"] == 1.0 and always["target_without_trigger"] == 1.0
    rule = model_metrics(PixelRuleModel(), data, trigger=set_label_pixel(0), target=0)
    assert rule["asr"] == 1.0
    assert rule["target_without_trigger"] == pytest.approx(2 / 17)  # 17 non-target images, 2 called 0
    assert rule["acc"] == pytest.approx(18 / 20)
    assert "target_without_trigger" not in model_metrics(PixelRuleModel(), data)


def test_predict_restores_training_mode():
    model = PixelRuleModel().train()
    predict(model, encoded_label_dataset())
    assert model.training


def test_mismatched_model_and_data_are_rejected():
    data = encoded_label_dataset()
    with pytest.raises(KDBackdoorError, match="5 classes"):
        accuracy(PixelRuleModel(num_classes=5), data)
    with pytest.raises(KDBackdoorError, match="target 7 out of range"):
        attack_success_rate(PixelRuleModel(), data, lambda x: x, target=7)
