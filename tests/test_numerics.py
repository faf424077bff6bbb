"""The numerics policy: precision resolution, autocast, layout, loss scaling, records, CLI and config."""

import json

import pytest
import torch

from kdbackdoor.models import build_model
from kdbackdoor.numerics import (Numerics, autocast, bf16_native, current_numerics, grad_scaler, layout,
                                 numerics_record, resolve_precision, to_layout, use_numerics)
from kdbackdoor.run_record import environment
from kdbackdoor.training import TrainConfig, cross_entropy_loss, fit

CPU = torch.device("cpu")


def test_auto_is_bf16_exactly_where_the_device_has_native_bf16():
    assert resolve_precision("auto", CPU) == ("bf16" if bf16_native(CPU) else "fp32")
    assert resolve_precision("fp32", CPU) == "fp32" and resolve_precision("bf16", CPU) == "bf16"
    assert resolve_precision("auto", torch.device("meta")) == "fp32"  # no native bf16 known: fp32


@pytest.mark.parametrize("precision, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16),
                                              ("fp16", torch.float16)])
def test_autocast_runs_matrix_products_in_the_policy_precision(precision, dtype):
    layer, x = torch.nn.Linear(8, 4), torch.randn(3, 8)
    with use_numerics(Numerics(precision)), autocast(CPU):
        assert layer(x).dtype == dtype
    assert current_numerics() == Numerics()  # the block's policy is gone afterwards


def test_layout_follows_the_policy_and_leaves_values_unchanged():
    model = build_model("small-cnn", num_classes=10, in_channels=1, input_size=(8, 8)).eval()
    x = torch.rand(4, 1, 8, 8)
    reference = model(x)
    with use_numerics(Numerics("fp32", channels_last=False)):
        to_layout(model)
        assert next(p for p in model.parameters() if p.dim() == 4).is_contiguous()
        assert layout(x.contiguous(memory_format=torch.channels_last)).is_contiguous()
    with use_numerics(Numerics("fp32", channels_last=True)):
        to_layout(model)
        assert next(p for p in model.parameters() if p.dim() == 4).is_contiguous(memory_format=torch.channels_last)
        assert torch.allclose(model(layout(x)), reference, atol=1e-5)


def test_invalid_precision_is_refused():
    with pytest.raises(ValueError, match="precision must be one of"):
        Numerics("fp8")


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_training_learns_digits_and_says_so(precision, digits, tmp_path):
    """A small CNN trained in bf16 or fp16 (with its loss scale) learns 8x8 digits as fp32 does."""
    train, test = digits
    config = TrainConfig(epochs=6, batch_size=64, lr=0.05, crop_padding=0, hflip=False, eval_every=0, seed=0)
    accuracies = {}
    for name in ("fp32", precision):
        torch.manual_seed(0)
        model = build_model("small-cnn", num_classes=10, in_channels=1, input_size=(8, 8))
        with use_numerics(Numerics(name)):
            history = fit(model, train, config, tmp_path / name, loss_fn=cross_entropy_loss(), test=test,
                          device=CPU, progress=False)
            assert numerics_record(CPU)["precision"] == name
            assert environment(CPU, 0)["numerics"]["precision"] == name
        accuracies[name] = history[-1]["test_acc"]
    assert accuracies["fp32"] > 0.8
    assert accuracies[precision] > accuracies["fp32"] - 0.05, accuracies


def test_grad_scaler_only_for_fp16():
    for precision, enabled in (("fp32", False), ("bf16", False), ("fp16", True)):
        with use_numerics(Numerics(precision)):
            assert grad_scaler(CPU).is_enabled() is enabled


def test_cli_precision_reaches_the_run_record(monkeypatch, capsys, tmp_path):
    from kdbackdoor.cli import main
    args = ["--precision", "bf16", "--no-channels-last", "train-teacher", "--dataset", "digits", "--arch",
            "small-cnn", "--out", str(tmp_path / "t"), "--epochs", "1", "--no-progress"]
    monkeypatch.setattr("sys.argv", ["kdbackdoor", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert not exit_info.value.code, capsys.readouterr().err
    numerics = json.loads((tmp_path / "t" / "metrics.json").read_text())["environment"]["numerics"]
    assert numerics == {"precision_requested": "bf16", "precision": "bf16", "channels_last": False,
                        "compile": False}


def test_cli_refuses_an_unknown_precision(monkeypatch, capsys, tmp_path):
    from kdbackdoor.cli import main
    monkeypatch.setattr("sys.argv", ["kdbackdoor", "--precision", "fp8", "train-teacher", "--dataset", "digits",
                                     "--out", str(tmp_path / "t")])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    assert "--precision must be one of" in capsys.readouterr().err


def test_config_runtime_section_is_not_part_of_the_run_identity():
    from kdbackdoor.experiment.config import validate_config
    plain = validate_config({"data": {"dataset": "digits"}}, "test")
    fp32 = validate_config({"data": {"dataset": "digits"}, "runtime": {"precision": "fp32"}}, "test")
    assert plain.run_id() == fp32.run_id()
    assert fp32.runtime.numerics() == Numerics("fp32", True, False)
