"""Reports: tables with mean ± std over seeds in the papers' layouts, plots, images, HTML and Markdown."""

import base64
import io
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from kdbackdoor.atomic import write_json
from kdbackdoor.errors import KDBackdoorError
from kdbackdoor.experiment.config import apply_overrides, validate_config
from kdbackdoor.experiment.index import record_row, update_index
from kdbackdoor.experiment.report import write_report
from kdbackdoor.experiment.runner import RUN_FORMAT
from kdbackdoor.experiment.summary import abd_table, attack_tables, experiment_tables, load_runs, stat

from test_cli import run

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (24, 8), value).save(buffer, format="PNG")
    return buffer.getvalue()


def add_run(results: Path, overrides: dict, metrics: dict, teacher: dict, baseline: dict | None = None,
            poisoned: bool = False, sweep: str = "s") -> str:
    """A complete run record as the runner writes it, with known metrics and pictures."""
    config = validate_config(apply_overrides({}, overrides))
    run_id = config.run_id()
    folder = results / "runs" / run_id
    folder.mkdir(parents=True)
    (folder / "trigger.png").write_bytes(_png(200))
    artifacts = {"trigger": "trigger.png"}
    stages = {"teacher": {"key": "t", "cached": True}}
    if poisoned:
        (folder / "poisons.png").write_bytes(_png(100))
        artifacts["poisons"] = "poisons.png"
        stages["poisoned_set"] = {"key": f"set-{config.poison.rate}-{config.poison.method}", "cached": False}
    record = {"format": RUN_FORMAT, "run_id": run_id, "name": config.name, "sweep": sweep, "label": {},
              "config": config.to_data(), "metrics": metrics, "teacher_metrics": teacher,
              "baseline_metrics": baseline, "poisoned_set": {"counts": {}} if poisoned else None,
              "stages": stages, "artifacts": artifacts, "seconds": 1.0}
    write_json(folder / "metrics.json", record)
    update_index(results, [record_row(record, f"runs/{run_id}")])
    return run_id


@pytest.fixture
def attack_results(tmp_path):
    """λ ∈ {0.5, 1} × seeds {0, 1}: ASR 0.2/0.4 at λ = 0.5, 0.9/0.9 at λ = 1; the target without the
    trigger 10% at λ = 0.5, 6% at λ = 1."""
    results = tmp_path / "attack"
    asr = {(0.5, 0): 0.2, (0.5, 1): 0.4, (1.0, 0): 0.9, (1.0, 1): 0.9}
    for (lam, seed), value in asr.items():
        add_run(results, {"seed": seed, "distill.kd.kd_lambda": lam, "poison.rate": 0.05},
                {"acc": 0.9 + seed * 0.02, "asr": value, "target_without_trigger": 0.1 if lam == 0.5 else 0.06},
                {"acc": 0.95, "asr": 0.01},
                baseline={"acc": 0.91, "asr": 0.05}, poisoned=True)
    return results


@pytest.fixture
def abd_results(tmp_path):
    """Backdoored teachers (two triggers) distilled with zskt without and with ABD, 2 seeds."""
    results = tmp_path / "abd"
    for trigger, teacher_asr in (("badnets-grid", 0.99), ("blend", 0.97)):
        for defense, student_asr in (("none", 0.95), ("abd", 0.01)):
            for seed in (0, 1):
                add_run(results, {"seed": seed, "teacher.backdoor.trigger": trigger, "distill.method": "zskt",
                                  "distill.defense": defense},
                        {"acc": 0.70 + 0.01 * seed, "asr": student_asr}, {"acc": 0.92, "asr": teacher_asr})
    return results


def test_mean_and_sample_std_over_seeds():
    assert stat([0.2, 0.4]) == "30.0 ± 14.1"
    assert stat([0.9]) == "90.0" and stat([]) == "–"


def test_attack_tables_put_each_factor_against_asr_and_acc(attack_results):
    runs = load_runs([attack_results])
    assert len(runs) == 4
    [overview] = experiment_tables(runs)
    assert overview.columns[:6] == ["run", "settings that vary", "n", "ACC", "ASR", "target w/o trigger"]
    assert [row[1:5] for row in overview.rows] == [["kd.kd_lambda=0.5", "2", "91.0 ± 1.4", "30.0 ± 14.1"],
                                                  ["kd.kd_lambda=1", "2", "91.0 ± 1.4", "90.0 ± 0.0"]]
    [vs_lambda] = attack_tables(runs)
    assert vs_lambda.title.endswith("vs λ")
    assert vs_lambda.columns == ["λ", "n", "ACC", "ASR", "target w/o trigger", "unpoisoned ACC", "unpoisoned ASR"]
    assert vs_lambda.rows == [["0.5", "2", "91.0 ± 1.4", "30.0 ± 14.1", "10.0 ± 0.0", "91.0 ± 0.0", "5.0 ± 0.0"],
                              ["1", "2", "91.0 ± 1.4", "90.0 ± 0.0", "6.0 ± 0.0", "91.0 ± 0.0", "5.0 ± 0.0"]]
    assert abd_table(runs) is None  # clean teacher: not ABD's layout


def test_abd_table_has_one_row_per_trigger_and_columns_per_method_and_defense(abd_results):
    table = abd_table(load_runs([abd_results]))
    assert table.columns == ["trigger", "teacher ACC / ASR", "zskt", "zskt + ABD"]
    assert table.rows == [["badnets-grid", "92.0 ± 0.0 / 99.0 ± 0.0", "70.5 ± 0.7 / 95.0 ± 0.0", "70.5 ± 0.7 / 1.0 ± 0.0"],
                          ["blend", "92.0 ± 0.0 / 97.0 ± 0.0", "70.5 ± 0.7 / 95.0 ± 0.0", "70.5 ± 0.7 / 1.0 ± 0.0"]]


def test_html_report_is_one_self_contained_page(attack_results, abd_results, tmp_path):
    out = write_report([attack_results, abd_results], tmp_path / "report.html")
    text = out.read_text()
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    for heading in ("Summary", "Poisoned distillation set", "ABD layout", "ASR and ACC vs λ", "Plots", "Triggers",
                    "Poisons"):
        assert heading in text
    assert "30.0 ± 14.1" in text and "70.5 ± 0.7 / 1.0 ± 0.0" in text
    sources = re.findall(r"src='([^']*)'", text)
    assert len(sources) >= 4 and all(src.startswith("data:image/png;base64,") for src in sources)
    for src in sources:  # every inline image decodes as a PNG
        Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).verify()
    assert "http://" not in text and "https://" not in text and "<link" not in text and "<script" not in text


def test_markdown_report_links_pictures_written_beside_it(attack_results, tmp_path):
    out = write_report([attack_results], tmp_path / "report.md")
    text = out.read_text()
    assert "| λ | n | ACC | ASR | target w/o trigger | unpoisoned ACC | unpoisoned ASR |" in text
    assert "| 0.5 | 2 | 91.0 ± 1.4 | 30.0 ± 14.1 | 10.0 ± 0.0 | 91.0 ± 0.0 | 5.0 ± 0.0 |" in text
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert "report_files/asr_vs_lambda.png" in links and "report_files/acc_vs_asr.png" in links
    for link in links:
        Image.open(tmp_path / link).verify()


def test_report_refuses_folders_without_runs(tmp_path, monkeypatch, capsys):
    with pytest.raises(KDBackdoorError, match="no index.csv"):
        write_report([tmp_path], tmp_path / "r.html")
    (tmp_path / "index.csv").write_text("run_id,status,run_dir\n")
    code, _, err = run(monkeypatch, capsys, "report", tmp_path, "--out", tmp_path / "r.html")
    assert code == 2 and "no complete run" in err


def test_cli_report_writes_markdown(attack_results, tmp_path, monkeypatch, capsys):
    code, out, _ = run(monkeypatch, capsys, "report", attack_results, "--out", tmp_path / "r.txt", "--format", "md")
    assert code == 0 and "r.txt" in out
    assert "| λ | n |" in (tmp_path / "r.txt").read_text()


LAYOUT_CHECK = """<script>
window.addEventListener("load", () => {
  const page = document.documentElement.clientWidth;
  const tables = [...document.querySelectorAll("table")].map(t => ({
    title: t.previousElementSibling && t.previousElementSibling.previousElementSibling
      ? t.previousElementSibling.previousElementSibling.textContent : "",
    right: t.getBoundingClientRect().right, page}));
  const plots = [...document.querySelectorAll("img.plot")].map(i => ({
    alt: i.alt, shown: i.getBoundingClientRect().width, natural: i.naturalWidth}));
  const out = document.createElement("pre");
  out.id = "layout";
  out.textContent = JSON.stringify({page, scroll: document.documentElement.scrollWidth, tables, plots});
  document.body.appendChild(out);
});
</script>"""


def chromium_layout(page: Path, tmp_path: Path) -> dict:
    """Open ``page`` (with a measuring script added) in headless Chromium at 1280 px; what it measured."""
    import html
    import json
    probe = tmp_path / "probe.html"
    probe.write_text(page.read_text().replace("</body>", LAYOUT_CHECK + "</body>"))
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--hide-scrollbars", f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,2000",
               "--virtual-time-budget=10000", "--dump-dom", probe.resolve().as_uri()]
    dom = subprocess.run(command, capture_output=True, text=True, timeout=180, check=True).stdout
    found = re.search(r'<pre id="layout">(.*?)</pre>', dom, re.S)
    assert found, dom[-2000:]
    return json.loads(html.unescape(found.group(1)))


@pytest.fixture
def demo_like_results(tmp_path):
    """Runs shaped like the demo's: three experiments that differ in dozens of config keys."""
    results = tmp_path / "demo"
    add_run(results, {"name": "poisoned-distillation-set", "poison.rate": 0.2, "poison.method": "pgd",
                      "distill.student_arch": "wrn-16-1", "distill.kd.kd_lambda": 0.5},
            {"acc": 0.97, "asr": 0.22, "target_without_trigger": 0.0}, {"acc": 0.967, "asr": 0.0},
            baseline={"acc": 0.97, "asr": 0.0}, poisoned=True)
    for name, defense in (("data-free", "none"), ("data-free-abd", "abd")):
        extra = {"distill.vaccine.copies": 1, "distill.retrospection.rounds": 5} if defense == "abd" else {}
        add_run(results, {"name": name, "teacher.backdoor.trigger": "badnets-grid", "distill.method": "deepinversion",
                          "distill.defense": defense, "distill.student_arch": "small-cnn", **extra},
                {"acc": 0.84 if defense == "none" else 0.89, "asr": 1.0 if defense == "none" else 0.93},
                {"acc": 0.969, "asr": 1.0})
    return results


def test_report_names_runs_shows_only_what_varies_and_audits_filters(demo_like_results, tmp_path):
    audit = {"name": "label-disagreement", "set": "digits + 360 poisons", "auroc": 0.869, "tpr_at_5fpr": 0.414,
             "flagged": 11, "poisons": 360, "true_positives": 0, "precision": 0.0, "recall": 0.0}
    text = write_report([demo_like_results], tmp_path / "report.html", audits=[audit]).read_text()
    headings = re.findall(r"<h2>(.*?)</h2>", text)
    assert headings[:4] == ["Summary", "Poisoned distillation set (clean teacher)", "Data-free distillation",
                            "Filter audits"]
    data_free = text.split("<h2>Data-free distillation</h2>")[1].split("</table>")[0]
    assert "data-free-abd" in data_free and ">distill.defense=abd<" in data_free  # the ABD sub-settings do not vary
    assert "vaccine" not in data_free and "student_arch" not in data_free
    assert "ACC +5.0" in data_free  # the defense's cost against the same settings undefended
    audits = text.split("<h2>Filter audits</h2>")[1].split("</table>")[0]
    assert "0 of 360" in audits and "<td>0.869</td>" in audits


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (apt-get install chromium)")
def test_html_report_fits_a_1280_px_window_in_headless_chromium(attack_results, abd_results, demo_like_results,
                                                                 tmp_path):
    for name, folders in (("papers", [attack_results, abd_results]), ("demo", [demo_like_results])):
        out = write_report(folders, tmp_path / f"{name}.html")
        layout = chromium_layout(out, tmp_path)
        assert layout["page"] >= 1200 and layout["scroll"] <= layout["page"], layout  # no horizontal scrolling
        assert layout["tables"] and layout["plots"]
        for table in layout["tables"]:
            assert table["right"] <= table["page"], (name, table)
        for plot in layout["plots"]:
            assert plot["natural"] > 300 and plot["shown"] >= 0.8 * plot["natural"], (name, plot)
