"""A model is audited for memorization before it is pushed: ``memdistill push`` and the training scripts'
``--push_to_hub`` run `hub_audit.audit_before_push` and make the card from its metrics.json, unless given an earlier
audit (``--metrics``) or told to upload without one (``--no_audit``, ``--push_without_audit``: the card says so)."""

import json
import os
import shutil

import pytest
from huggingface_hub import HfApi, ModelCard

from conftest import tiny_unet
from diffusers_memdistill import hub, hub_audit
from diffusers_memdistill.cli import main as cli_main
from diffusers_memdistill.data import build_training_set
from diffusers_memdistill.pipelines.pipeline_edm import EDMPipeline
from diffusers_memdistill.schedulers.scheduling_edm_heun import EDMHeunScheduler
from test_runner import run_toy, toy_args

TOKEN = "hf_TestTokenThatMustNeverBeWritten0123"
UNAUDITED = "This model was uploaded without a memorization audit (--no_audit)"


@pytest.fixture(scope="module")
def saved_teacher(tmp_path_factory):
    """A tiny EDM teacher folder as train_edm_teacher.py writes it, and a real audit of it in ``audit/``."""
    root = tmp_path_factory.mktemp("push_audit")
    teacher = root / "teacher"
    EDMPipeline(tiny_unet(seed=0), EDMHeunScheduler(num_inference_steps=3)).save_pretrained(teacher)
    build_training_set("digits", 8, num_train_images=20).save(teacher)
    (teacher / "training_config.json").write_text(json.dumps(
        {"script": "train_edm_teacher.py", "dataset": "digits", "output_dir": str(teacher), "hub_token": None}))
    metrics = hub_audit.audit_before_push(str(teacher), str(root / "audit"), num_samples=16, device="cpu")
    return teacher, metrics


@pytest.fixture
def teacher(saved_teacher, tmp_path):
    """A copy of the teacher that a test may audit (its audit folder goes beside it, in ``tmp_path``)."""
    shutil.copytree(saved_teacher[0], tmp_path / "teacher")
    return tmp_path / "teacher"


def _no_audit_allowed(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was audited although it should not have been")

    monkeypatch.setattr(hub_audit, "audit_before_push", refuse)


def _push(model, *flags):
    return cli_main(["push", "--model", str(model), "--repo_id", "someone/tiny-teacher", *map(str, flags)])


def test_dry_run_audits_the_model_and_the_card_shows_the_audit(teacher, tmp_path):
    before = sorted(os.listdir(teacher))
    assert _push(teacher, "--dry_run", tmp_path / "upload", "--audit_num_samples", 16, "--audit_device", "cpu") == 0
    audit = tmp_path / "teacher-audit"  # beside the model, never inside it
    results = json.loads((audit / "metrics.json").read_text())
    assert sorted(os.listdir(teacher)) == before
    assert results["num_samples"] == 16 and results["metrics"] == ["l2", "fd_pixel"]
    row = results["models"]["teacher"]
    assert row["path"] == str(teacher)
    text = (tmp_path / "upload" / "README.md").read_text()
    assert (f"| **this model (teacher)** | 16 | {row['fd_pixel']:.4g} | {100 * row['l2']['fraction_memorized']:.2f}% | "
            f"{row['l2']['p95']:.4g} |") in text
    floor = results["floor"]["train0"]["l2"]
    assert "| held-out real images (digits train, floor) | 16 | " in text and f"{floor['p95']:.4g} |" in text
    assert "**Floor**" in text and "Not evaluated" not in text and "without a memorization audit" not in text
    card = ModelCard.load(tmp_path / "upload" / "README.md")
    assert {r.metric_type: r.metric_value for r in card.data.eval_results}["memorization_l2_ratio"] == \
        row["l2"]["fraction_memorized"]
    # The upload holds the audit's metrics.json and the figures the card shows, and nothing else of the audit.
    assert (tmp_path / "upload" / "metrics.json").read_bytes() == (audit / "metrics.json").read_bytes()
    uploaded = {os.path.relpath(os.path.join(r, f), tmp_path / "upload") for r, _, fs in os.walk(tmp_path / "upload")
                for f in fs}
    assert not any(p.startswith(("samples", hub_audit.AUDIT_MARKER)) for p in uploaded)
    assert {p for p in uploaded if p.startswith("figures")} <= {
        "figures/" + f for f in os.listdir(audit / "figures")}
    # Pushing again replaces the earlier audit of the same model.
    assert _push(teacher, "--dry_run", tmp_path / "again", "--audit_num_samples", 8, "--audit_device", "cpu") == 0
    assert json.loads((audit / "metrics.json").read_text())["num_samples"] == 8


def test_no_audit_uploads_without_one_and_the_card_says_so(saved_teacher, teacher, tmp_path, monkeypatch):
    # A metrics.json left in the model folder (which a card shows by default) is not shown either.
    results = json.loads(open(saved_teacher[1]).read())
    results["models"]["teacher"]["path"] = str(teacher)
    (teacher / "metrics.json").write_text(json.dumps(results))
    assert "| **this model (teacher)** | 16 |" in hub.render_model_card(teacher)[0].content
    _no_audit_allowed(monkeypatch)
    assert _push(teacher, "--dry_run", tmp_path / "upload", "--no_audit") == 0
    text = (tmp_path / "upload" / "README.md").read_text()
    assert UNAUDITED in text and "> [!WARNING]" in text and "**Not evaluated**" in text
    assert "| **this model" not in text and ModelCard(text).data.eval_results is None
    assert not (tmp_path / "upload" / "metrics.json").exists() and not (tmp_path / "teacher-audit").exists()
    with pytest.raises(ValueError, match="pass the metrics or --no_audit, not both"):
        hub.render_model_card(teacher, unaudited="--no_audit", metrics_path="metrics.json")


def test_metrics_of_an_earlier_audit_skip_the_audit(saved_teacher, tmp_path, monkeypatch, capsys):
    teacher, metrics = saved_teacher
    _no_audit_allowed(monkeypatch)
    assert _push(teacher, "--dry_run", tmp_path / "upload", "--metrics", metrics) == 0
    text = (tmp_path / "upload" / "README.md").read_text()
    row = json.loads(open(metrics).read())["models"]["teacher"]
    assert f"| **this model (teacher)** | 16 | {row['fd_pixel']:.4g} |" in text
    assert not os.path.exists(str(teacher) + "-audit")
    # Flags that contradict each other are refused before anything is written.
    assert _push(teacher, "--dry_run", tmp_path / "x", "--metrics", metrics, "--no_audit") == 2
    assert "pass one of them" in capsys.readouterr().err
    assert _push(teacher, "--dry_run", tmp_path / "x", "--metrics", metrics, "--audit_metrics", "l2") == 2
    assert "--audit_metrics set the audit, which --metrics skips" in capsys.readouterr().err
    # An audit the card cannot show (missing, or of another model) stops the upload: it never says "not evaluated".
    assert _push(teacher, "--dry_run", tmp_path / "x", "--metrics", tmp_path / "missing.json") == 2
    assert "missing.json does not exist. Pass the metrics.json of an audit of this model" in capsys.readouterr().err
    results = json.loads(open(metrics).read())
    results["models"]["teacher"]["path"] = "/another/model"
    (tmp_path / "other.json").write_text(json.dumps(results))
    assert _push(teacher, "--dry_run", tmp_path / "x", "--metrics", tmp_path / "other.json") == 2
    assert "no row for this model" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_the_upload_carries_the_audit_and_a_missing_token_stops_before_it(teacher, tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-tokens"))
    real_audit, events, sent = hub_audit.audit_before_push, [], {}

    def audit(*args, **kwargs):
        events.append("audit")
        return real_audit(*args, **kwargs)

    def create_commit(api, repo_id, operations, **kwargs):
        events.append("commit")
        sent.update({op.path_in_repo: open(op.path_or_fileobj, "rb").read() for op in operations})
        return type("CommitInfo", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/abc"})()

    monkeypatch.setattr(hub_audit, "audit_before_push", audit)
    monkeypatch.setattr(HfApi, "create_repo", lambda api, repo_id, **kwargs: None)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    assert _push(teacher, "--audit_num_samples", 8) == 2  # no token: refused before the audit
    assert "No Hugging Face token" in capsys.readouterr().err and events == []
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert _push(teacher, "--audit_num_samples", 8, "--audit_device", "cpu") == 0
    assert events == ["audit", "commit"]
    assert sent["metrics.json"] == (tmp_path / "teacher-audit" / "metrics.json").read_bytes()
    assert "| **this model (teacher)** | 8 |" in sent["README.md"].decode()


def _fake_evaluation(calls):
    def run(model_dir, output_dir, **kwargs):
        calls.append((model_dir, output_dir, kwargs))
        with open(os.path.join(output_dir, "metrics.json"), "w") as f:
            json.dump({"models": {"teacher": {"path": model_dir}}}, f)

    return run


def test_the_audit_folder_is_never_inside_the_model(teacher, tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(hub_audit, "_run_evaluation", _fake_evaluation(calls))
    for inside in (teacher / "audit", teacher, tmp_path):  # in the model, the model itself, a folder holding it
        with pytest.raises(ValueError, match="is, holds or lies inside the model folder"):
            hub_audit.audit_before_push(str(teacher), str(inside))
    assert _push(teacher, "--dry_run", tmp_path / "upload", "--audit_output_dir", teacher / "audit") == 2
    assert "lies inside the model folder" in capsys.readouterr().err
    assert calls == [] and not (teacher / "audit").exists() and not (tmp_path / "upload").exists()
    # The default folder is beside the model; it holds nothing of the model's files.
    path = hub_audit.audit_before_push(str(teacher), num_samples=8, metrics="l2")
    assert path == str(tmp_path / "teacher-audit" / "metrics.json")
    assert calls[-1][2]["num_samples"] == 8 and calls[-1][2]["metrics"] == ("l2",)
    # A folder that is not an earlier audit of this model is never replaced.
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="is not an earlier audit of"):
        hub_audit.audit_before_push(str(teacher), str(other))
    assert (other / "notes.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="Unknown audit metric 'lpips'"):
        hub_audit.audit_before_push(str(teacher), metrics="l2,lpips")
    with pytest.raises(ValueError, match="at least 2 samples"):
        hub_audit.audit_before_push(str(teacher), num_samples=1)


def test_a_text_to_image_model_gets_the_text_to_image_audit(sd_teacher, tmp_path, monkeypatch):
    """The dispatch only (a real text-to-image audit samples 50 steps per image: too slow here); its keywords are
    checked against the evaluation's signature."""
    import inspect

    import diffusers_memdistill.evaluation as evaluation

    calls, real = [], evaluation.evaluate

    def fake_evaluate(model_paths, output_dir, **kwargs):
        inspect.signature(real).bind(model_paths, output_dir, **kwargs)
        calls.append((model_paths, kwargs))
        with open(os.path.join(output_dir, "metrics.json"), "w") as f:
            json.dump({"models": {}}, f)

    monkeypatch.setattr(evaluation, "evaluate", fake_evaluate)
    model = tmp_path / "sd"
    shutil.copytree(sd_teacher["teacher"], model)
    path = hub_audit.audit_before_push(str(model), num_samples=10, device="cpu", sscd_weights="sscd.pt")
    assert path == str(tmp_path / "sd-audit" / "metrics.json")
    assert calls == [([str(model)], {"metrics": ("l2",), "num_prompts": 2, "samples_per_prompt": 4, "seed": 0,
                                     "batch_size": None, "device": "cpu", "sscd_weights": "sscd.pt"})]
    with pytest.raises(ValueError, match="--inception_weights does not apply to a text-to-image model"):
        hub_audit.audit_before_push(str(model), inception_weights="inception.pt")


# ---------------------------------------------------------------------------------------------------------------
# Training scripts: --push_to_hub audits on the main process, then pushes with the audit's metrics.json.


def _record_push(monkeypatch, audit_fails=False):
    events = []

    def fake_audit(model_dir, output_dir=None, **kwargs):
        assert os.path.isfile(os.path.join(model_dir, "model_index.json"))  # the finished model is saved
        if audit_fails:
            raise RuntimeError("no training set")
        folder = hub_audit.default_audit_dir(model_dir)
        os.makedirs(folder)
        path = os.path.join(folder, "metrics.json")
        with open(path, "w") as f:
            json.dump({"models": {}}, f)
        events.append(("audit", model_dir, kwargs))
        return path

    def fake_push(model_dir, repo_id, *, token=None, private=False, metrics_path=None, unaudited=None, **kwargs):
        events.append(("push", metrics_path, metrics_path is not None and os.path.isfile(metrics_path), unaudited))
        return f"https://huggingface.co/{repo_id}/commit/0"

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr(hub_audit, "audit_before_push", fake_audit)
    monkeypatch.setattr(hub, "check_audit", lambda model_dir, path, *args: events.append(("check", path)))
    monkeypatch.setattr(hub, "push_to_hub_folder", fake_push)
    return events


def test_training_push_audits_before_pushing(tmp_path, monkeypatch):
    events = _record_push(monkeypatch)
    out = tmp_path / "run"
    run_toy(toy_args(out, "--push_to_hub", "--hub_model_id", "someone/toy", "--push_audit_num_samples", 8,
                     "--push_audit_metrics", "l2"))
    metrics = str(tmp_path / "run-audit" / "metrics.json")
    assert events == [("audit", str(out), {"num_samples": 8, "metrics": "l2", "device": "cpu"}),
                      ("check", metrics), ("push", metrics, True, None)]


def test_training_push_without_audit_says_so(tmp_path, monkeypatch):
    events = _record_push(monkeypatch, audit_fails=True)
    run_toy(toy_args(tmp_path / "run", "--push_to_hub", "--hub_model_id", "someone/toy", "--push_without_audit"))
    assert events == [("push", None, False, "--push_without_audit")]


def test_a_failed_training_audit_pushes_nothing(tmp_path, monkeypatch):
    events = _record_push(monkeypatch, audit_fails=True)
    with pytest.raises(RuntimeError, match=r"audit before the push failed .*no training set.*memdistill push --model"):
        run_toy(toy_args(tmp_path / "run", "--push_to_hub", "--hub_model_id", "someone/toy"))
    assert events == [] and (tmp_path / "run" / "model_index.json").is_file()


@pytest.mark.parametrize("flags, message", [
    (["--push_without_audit"], "are used with --push_to_hub"),
    (["--push_audit_num_samples", "8"], "are used with --push_to_hub"),
    (["--push_to_hub", "--hub_model_id", "a/b", "--push_without_audit", "--push_audit_metrics", "l2"],
     "that --push_without_audit skips"),
    (["--push_to_hub", "--hub_model_id", "a/b", "--push_audit_num_samples", "1"], "must be at least 2"),
    (["--push_to_hub", "--hub_model_id", "a/b", "--push_audit_metrics", "l2,lpips"], "Unknown audit metric 'lpips'"),
])
def test_training_audit_flags_are_checked_before_training(tmp_path, monkeypatch, capsys, flags, message):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with pytest.raises(SystemExit) as exc:
        toy_args(tmp_path / "run", *flags)
    assert exc.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("script", ["train_edm_teacher", "distill_consistency", "distill_dmd", "distill_progressive",
                                    "finetune_sd_memorize", "distill_lcm"])
def test_every_training_script_has_the_audit_flags(script, capsys):
    import importlib

    module = importlib.import_module(f"diffusers_memdistill.training.{script}")
    with pytest.raises(SystemExit):
        module.parse_args(["--help"])
    text = capsys.readouterr().out
    assert all(flag in text for flag in ("--push_audit_num_samples", "--push_audit_metrics", "--push_without_audit"))
    assert "(default 1000;" in text and "(default l2,fd_pixel; l2 for text-to-image" in " ".join(text.split())
