import json
import os
import shutil

import pytest
import torch
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.repocard_data import model_index_to_eval_results
from safetensors.torch import save_file

from conftest import run_without_package, tiny_unet
from diffusers_memdistill import hub
from diffusers_memdistill.cli import main as cli_main
from diffusers_memdistill.data import build_training_set
from diffusers_memdistill.evaluation import evaluate
from diffusers_memdistill.pipelines.pipeline_consistency import ConsistencyStudentPipeline
from diffusers_memdistill.pipelines.pipeline_edm import EDMPipeline
from diffusers_memdistill.schedulers.scheduling_consistency import ConsistencyStudentScheduler
from diffusers_memdistill.schedulers.scheduling_edm_heun import EDMHeunScheduler

TOKEN = "hf_TestTokenThatMustNeverBeWritten0123"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A teacher and a student folder as the training scripts write them, and a real evaluation of both."""
    root = tmp_path_factory.mktemp("run")
    training_set = build_training_set("digits", 8, num_train_images=20)
    teacher, student = root / "teacher", root / "student"
    EDMPipeline(tiny_unet(seed=0), EDMHeunScheduler(num_inference_steps=3)).save_pretrained(teacher)
    ConsistencyStudentPipeline(tiny_unet(seed=1), ConsistencyStudentScheduler()).save_pretrained(student)
    for folder, config in (
        (teacher, {"script": "train_edm_teacher.py", "dataset": "digits", "output_dir": str(teacher),
                   "max_train_steps": 10, "hub_token": None}),
        (student, {"script": "distill_consistency.py", "teacher": str(teacher), "teacher_sha256": "ab" * 32,
                   "loss": "pseudo_huber", "num_scales": 18, "output_dir": str(student), "hub_token": TOKEN,
                   "command": ["accelerate", "launch", "training_scripts/distill_consistency.py", "--teacher",
                               str(teacher), "--loss", "pseudo_huber", "--hub_token", TOKEN]}),
    ):
        training_set.save(folder)
        (folder / "training_config.json").write_text(json.dumps(config, indent=1))
    (student / "checkpoints").mkdir()
    (student / "checkpoints" / "optimizers.pt").write_bytes(b"not uploaded")
    evaluate([str(teacher), str(student)], str(root / "report"), num_samples=8, metrics=("l2", "fd_pixel", "pairing"),
             batch_size=8, student_steps=(1, 2), device="cpu", names=["teacher", "student"], floor=False)
    return root


def _metrics(run):
    return json.loads((run / "report" / "metrics.json").read_text())


def _write_metrics(tmp_path, results):
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps(results))
    return str(path)


def test_student_card_reports_the_real_metrics_field_by_field(tiny_run):
    results = _metrics(tiny_run)
    card, figures = hub.render_model_card(tiny_run / "student", metrics_path=str(tiny_run / "report" / "metrics.json"),
                                          repo_id="someone/tiny-cd")
    parsed = ModelCard(str(card))  # what the Hub reads back
    data = parsed.data
    assert data.library_name == "diffusers" and data.license == "apache-2.0" and data.base_model is None
    assert data.pipeline_tag == "unconditional-image-generation"
    assert {"diffusers-memdistill", "memorization", "consistency-distillation"} <= set(data.tags)
    # Every eval result is a number of metrics.json, for this model's rows only.
    model_name, eval_results = model_index_to_eval_results(card.data.to_dict()["model-index"])
    assert model_name == "tiny-cd"
    assert [(r.metric_type, r.metric_config) for r in data.eval_results] == [
        (r.metric_type, r.metric_config) for r in eval_results]
    expected = {}
    for row in ("student (1-step)", "student (2-step)"):
        m = results["models"][row]
        expected[("fd_pixel", row)] = m["fd_pixel"]
        expected[("memorization_l2_ratio", row)] = m["l2"]["fraction_memorized"]
        expected[("l2_ratio_p95", row)] = m["l2"]["p95"]
        expected[("pairing_delta_e", row)] = m["pairing"]["delta_e"]
    got = {(r.metric_type, r.metric_config): r.metric_value for r in eval_results}
    assert got == pytest.approx(expected, rel=0, abs=0)
    first = next(r for r in eval_results if r.metric_type == "memorization_l2_ratio")
    assert first.metric_args == {"num_samples": 8, "steps": 1, "seed": 0, "threshold": pytest.approx(1 / 3)}
    assert first.dataset_type == "digits" and first.dataset_split == "train"
    training_sha256 = results["training_sets"][results["models"]["student (1-step)"]["training_set"]]["sha256"]
    assert first.dataset_args == {"sha256": training_sha256}
    assert "teacher" not in {r.metric_config for r in eval_results}
    # The table: this model's rows and its teacher's, with the numbers of metrics.json.
    text = card.content
    teacher = results["models"]["teacher"]
    assert f"| teacher | 8 | {teacher['fd_pixel']:.4g} | " in text
    one = results["models"]["student (1-step)"]
    assert (f"| **this model, 1 step** | 8 | {one['fd_pixel']:.4g} | {100 * one['l2']['fraction_memorized']:.2f}% | "
            f"{one['l2']['p95']:.4g} | {one['pairing']['delta_e']:.4g} |") in text
    assert text.count("not measured |") == 1  # ΔE of the teacher
    assert "Memorized (L2 ratio < 1/3)" in text and "No floor row" in text
    assert "Not measured for this model: FID, SSCD copy detection." in text
    assert "Not evaluated" not in text
    # Provenance: training set, command (token redacted), resolved config, sampling settings, lineage.
    assert training_sha256 in text and "| num_images | 20 |" in text
    assert "--hub_token '<redacted>'" in text and '"hub_token": "<redacted>"' in text and TOKEN not in text
    assert '"num_scales": 18' in text and "| `sigma_max` | 80.0 |" in text
    assert f"the local folder `{tiny_run / 'teacher'}`" in text and "ab" * 32 in text
    assert 'DiffusionPipeline.from_pretrained("someone/tiny-cd", trust_remote_code=True)' in text
    assert "pipeline_consistency.py" in text and "[!WARNING]" not in text
    # Figures: every figure the card shows is one of the evaluation's, and is listed for copying.
    shown = {rel for _, rel in figures}
    assert shown == {"figures/samples_student__1-step.png", "figures/samples_student__2-step.png",
                     "figures/samples_teacher.png", "figures/memorized_student__1-step.png",
                     "figures/memorized_student__2-step.png", "figures/l2_ratio_histogram.png"}
    assert all(f"({rel})" in text for rel in shown) and all(os.path.isfile(src) for src, _ in figures)


def test_teacher_card_and_the_kind_of_each_folder(tiny_run):
    card, _ = hub.render_model_card(tiny_run / "teacher", metrics_path=str(tiny_run / "report" / "metrics.json"))
    results = _metrics(tiny_run)["models"]["teacher"]
    assert [r.metric_config for r in card.data.eval_results] == ["teacher"] * 3
    assert {r.metric_type: r.metric_value for r in card.data.eval_results}["fd_pixel"] == results["fd_pixel"]
    text = card.content
    assert "An EDM diffusion model" in text and "Not measured for this model: FID, SSCD copy detection." in text
    assert "ΔE" not in text.split("## Memorization and quality")[1].split("## Training data")[0].split("|---")[0]
    assert "None: trained from scratch by diffusers-memdistill." in text
    assert "The command line was not recorded" in text and "train_edm_teacher.py" in text
    assert hub.inspect_model_folder(tiny_run / "student").kind.name == "consistency_student"
    with pytest.raises(FileNotFoundError, match="not a saved pipeline"):
        hub.inspect_model_folder(tiny_run / "report")


def test_licence_and_base_model_follow_the_parent(tiny_run, tmp_path):
    teacher, student = tmp_path / "teacher", tmp_path / "student"
    shutil.copytree(tiny_run / "teacher", teacher)
    shutil.copytree(tiny_run / "student", student)
    config = json.loads((student / "training_config.json").read_text())
    (student / "training_config.json").write_text(json.dumps({**config, "teacher": str(teacher)}))
    # A teacher with a card passes its licence on; its Hub id, given, becomes the base model.
    (teacher / "README.md").write_text("---\nlicense: cc-by-nc-4.0\n---\n# teacher\n")
    card, _ = hub.render_model_card(student, base_model="someone/tiny-teacher")
    assert card.data.license == "cc-by-nc-4.0" and card.data.base_model == "someone/tiny-teacher"
    assert "inherited from the parent's model card" in card.content
    assert f"[`someone/tiny-teacher`](https://huggingface.co/someone/tiny-teacher) (trained from the local copy " \
           f"`{teacher}`)" in card.content
    # Without a card, the teacher's own parent decides (trained from scratch here: the project's licence).
    (teacher / "README.md").unlink()
    card, _ = hub.render_model_card(student, license="mit")
    assert card.data.license == "mit" and card.data.base_model is None
    card, _ = hub.render_model_card(student)
    assert card.data.license == "apache-2.0" and "inherited from the parent: the licence of diffusers-memdistill" in \
        card.content
    # A teacher downloaded from the Hub is recognised by its cache path.
    cached = tmp_path / "hub" / "models--someone--cached-teacher" / "snapshots" / "0123abc"
    shutil.copytree(tiny_run / "teacher", cached)
    (student / "training_config.json").write_text(json.dumps({**config, "teacher": str(cached)}))
    assert hub.render_model_card(student)[0].data.base_model == "someone/cached-teacher"
    with pytest.raises(ValueError, match="not of the form USER/NAME"):
        hub.render_model_card(student, base_model="not a repo")


@pytest.mark.parametrize("content, reason", [
    (None, "no metrics.json was given"),
    ("{not json", "not valid JSON"),
    ('{"models": {"x": {"fd_pixel": NaN}}}', "NaN, which is not JSON"),
    ('{"results": []}', "no 'models' object"),
    ("[1, 2]", "no 'models' object"),
    ('{"models": {"student": 3}}', "is a int, not an object"),
])
def test_missing_or_malformed_metrics_say_not_evaluated(tiny_run, tmp_path, content, reason):
    path = None
    if content is not None:
        path = tmp_path / "metrics.json"
        path.write_text(content)
    card, figures = hub.render_model_card(tiny_run / "student", metrics_path=None if path is None else str(path))
    assert card.data.eval_results is None and "model-index" not in str(card)
    assert "**Not evaluated**" in card.content and reason in card.content
    assert "| Row |" not in card.content and "not measured" not in card.content
    assert not figures  # no evaluation figures; and no validation grid was saved in this folder
    assert "No sample grid was saved with this model." in card.content


@pytest.mark.parametrize("mutate, reason", [
    (lambda r: r["models"]["student (1-step)"]["l2"].update(fraction_memorized="many"), "is 'many', not a number"),
    (lambda r: r["models"]["student (1-step)"]["l2"].update(fraction_memorized=1.5), "not a fraction in [0, 1]"),
    (lambda r: r["models"]["student (2-step)"].update(l2=[0.1]), "l2 is a list, not an object"),
    (lambda r: r["models"]["student (2-step)"].update(steps="two"), "steps is 'two', not an integer"),
    (lambda r: [m.update(path="/elsewhere") for m in r["models"].values()], "no row for this model"),
])
def test_a_metric_of_the_wrong_type_or_another_model_is_not_shown(tiny_run, tmp_path, mutate, reason):
    results = _metrics(tiny_run)
    mutate(results)
    path = _write_metrics(tmp_path, results)
    card, _ = hub.render_model_card(tiny_run / "student", metrics_path=path)
    assert card.data.eval_results is None and "**Not evaluated**" in card.content and reason in card.content
    out = hub.build_upload_folder(tiny_run / "student", str(tmp_path / "upload"), metrics_path=path)
    assert not os.path.exists(os.path.join(out, "metrics.json"))  # a malformed file is not published


def test_rows_named_explicitly_and_a_metric_absent_is_not_measured(tiny_run, tmp_path):
    results = _metrics(tiny_run)
    for row in results["models"].values():
        row["path"] = "/another/machine"
    del results["models"]["student (2-step)"]["fd_pixel"]
    path = _write_metrics(tmp_path, results)
    card, _ = hub.render_model_card(tiny_run / "student", metrics_path=path, metrics_rows=["student (2-step)"])
    assert [r.metric_type for r in card.data.eval_results] == ["memorization_l2_ratio", "l2_ratio_p95",
                                                                "pairing_delta_e"]
    assert "| **this model, 2 steps** | 8 | not measured |" in card.content
    card, _ = hub.render_model_card(tiny_run / "student", metrics_path=path, metrics_rows=["student (9-step)"])
    assert "no row 'student (9-step)'" in card.content


def test_warning_floor_row_and_sscd_preprocessing(tiny_run, tmp_path):
    results = _metrics(tiny_run)
    one = results["models"]["student (1-step)"]
    one["l2"]["fraction_memorized"] = 0.25
    one["sscd"] = {"threshold": 0.5, "num_samples": 8, "fraction_memorized": 0.75, "mean": 0.6, "p95": 0.9,
                   "preprocessing": "resize 256, centre crop 224, normalize 0.5"}
    results["floor"] = {"l2": {"threshold": 1 / 3, "num_samples": 8, "fraction_memorized": 0.0, "p95": 0.97},
                        "sscd": {"threshold": 0.5, "num_samples": 8, "fraction_memorized": 0.875, "p95": 0.95,
                                 "mean": 0.7, "preprocessing": "resize 256, centre crop 224, normalize 0.5"}}
    path = _write_metrics(tmp_path, results)
    card, _ = hub.render_model_card(tiny_run / "student", metrics_path=path)
    text = card.content
    assert "> [!WARNING]" in text
    assert ("25.00% of this model's 1-step samples are near-copies of training images (L2 nearest-neighbour ratio "
            "below 1/3; held-out real images: 0.00%).") in text
    assert "SSCD similarity above" not in text  # 75% is below the floor of held-out images (87.5%)
    assert "| held-out real images (floor) | 8 | not measured | 0.00% | 0.97 | 87.50% | 0.7 | 0.95 | not measured |" in text
    assert "threshold. Preprocessing:\n  resize 256, centre crop 224, normalize 0.5." in text
    assert "No floor row" not in text and "**Floor**" in text
    sscd = [r for r in card.data.eval_results if r.metric_type == "memorization_sscd"]
    assert len(sscd) == 1 and sscd[0].metric_value == 0.75
    assert sscd[0].metric_args["sscd_preprocessing_description"] == "resize 256, centre crop 224, normalize 0.5"
    # Below the threshold, no warning.
    quiet, _ = hub.render_model_card(tiny_run / "student", metrics_path=path, warning_threshold=0.5)
    assert "[!WARNING]" not in quiet.content


def test_floor_per_training_set_and_sscd_per_preprocessing(tiny_run, tmp_path):
    # metrics.json with a floor per training-set id, SSCD under two preprocessings, weight hashes, null values.
    results = _metrics(tiny_run)
    stats = lambda frac, p95, prep=None: {"threshold": 0.5, "num_samples": 8, "fraction_memorized": frac,  # noqa: E731
                                          "mean": 0.5, "p95": p95}
    for name, row in results["models"].items():
        row["training_set"] = "ts0"
        row["sscd"] = {"sscd": stats(0.5, 0.8), "dcr": stats(0.125, 0.4)}
    results["models"]["student (2-step)"]["fd_pixel"] = None
    results["null_values"] = {"models.student (2-step).fd_pixel": "NaN: no finite sample to compute it from",
                              "models.teacher.fid": "NaN"}
    results["floor"] = {
        "ts0": {"dataset": "digits", "split": "heldout", "num_images": 8, "l2": {"threshold": 1 / 3, "num_samples": 8,
                "fraction_memorized": 0.0, "p95": 0.99}, "sscd": {"sscd": stats(1.0, 0.9), "dcr": stats(0.0, 0.3)}},
        "other": {"l2": {"fraction_memorized": 0.5}}}
    results["weights"] = {"sscd": {"backend": "torchscript", "sha256": "ef" * 32, "preprocessings": {
        "sscd": "resize 288, ImageNet normalization", "dcr": "resize 256, centre crop 224, normalization 0.5"}}}
    results["warnings"] = ["FID from 8 images: compare it only within this report."]
    card, _ = hub.render_model_card(tiny_run / "student", metrics_path=_write_metrics(tmp_path, results))
    text = card.content
    assert "| Row | Samples | FD (pixels) ↓ | Memorized (L2 ratio < 1/3) | L2 ratio p95 | SSCD > 0.5 (dcr) | " \
           "SSCD > 0.5 (sscd) | SSCD mean (dcr) | SSCD mean (sscd) | SSCD p95 (dcr) | SSCD p95 (sscd) | ΔE vs teacher |" \
           in text
    assert ("| held-out real images (digits heldout, floor) | 8 | not measured | 0.00% | 0.99 | 0.00% | 100.00% | 0.5 "
            "| 0.5 | 0.3 | 0.9 | not measured |") in text
    assert text.count("floor) |") == 1  # the floor of another training set is not this model's
    assert "`dcr`: resize 256, centre crop 224, normalization 0.5." in text
    assert f"- Weights of sscd: backend torchscript, sha256 `{'ef' * 32}`." in text
    assert "- `models.student (2-step).fd_pixel` is null in metrics.json: NaN: no finite sample" in text
    assert "models.teacher.fid" not in text  # the teacher's nulls are not this model's
    assert "- Evaluation warning: FID from 8 images" in text
    # SSCD 50% is above 1% but below the floor of held-out images under `sscd` (100%); under `dcr` it is above (0%).
    assert "SSCD similarity above 0.5, preprocessing dcr; held-out real images: 0.00%)." in text
    assert "preprocessing sscd;" not in text
    by_config = {(r.metric_type, r.metric_config): r for r in card.data.eval_results}
    dcr = by_config[("memorization_sscd", "student (1-step), SSCD preprocessing dcr")]
    assert dcr.metric_value == 0.125 and dcr.metric_args["sscd_preprocessing"] == "dcr"
    assert dcr.metric_args["sscd_preprocessing_description"] == "resize 256, centre crop 224, normalization 0.5"
    assert ("fd_pixel", "student (2-step)") not in by_config


def _fake_component(folder, name, weights="diffusion_pytorch_model.safetensors"):
    (folder / name).mkdir(parents=True)
    (folder / name / "config.json").write_text("{}")
    save_file({"w": torch.zeros(2)}, str(folder / name / weights))


def _synthetic_metrics(folder, tmp_path, name, steps, clip=False):
    row = {"path": str(folder), "kind": "student", "steps": steps, "num_nan_samples": 0,
           "l2": {"threshold": 1 / 3, "num_samples": 16, "fraction_memorized": 0.0625, "p95": 0.8},
           "sscd": {"threshold": 0.5, "num_samples": 16, "fraction_memorized": 0.125, "mean": 0.3, "p95": 0.55,
                    "preprocessing": "resize 288, ImageNet normalization"}}
    if clip:
        row["clip"] = {"mean": 0.2875}
    return _write_metrics(tmp_path, {"num_samples": 16, "seed": 3, "models": {name: row}})


SD = "stable-diffusion-v1-5/stable-diffusion-v1-5"


@pytest.mark.parametrize("case", ["dmd", "sd_full", "sd_lora", "lcm_full", "lcm_lora"])
def test_templates_of_the_models_to_come(tmp_path, case):
    folder = tmp_path / case
    folder.mkdir()
    config = {"script": {"dmd": "distill_dmd.py", "sd_full": "finetune_sd_memorize.py",
                         "sd_lora": "finetune_sd_memorize.py"}.get(case, "distill_lcm.py")}
    if case == "dmd":
        config.update(teacher=str(tmp_path / "edm-teacher"), fake_updates_per_generator_update=5)
        (folder / "model_index.json").write_text(json.dumps({"_class_name": ["pipeline_dmd", "DMDGeneratorPipeline"],
                                                             "unet": ["diffusers", "UNet2DModel"]}))
        (folder / "pipeline_dmd.py").write_text("# single file\n")
        _fake_component(folder, "unet")
    elif case.endswith("lora"):
        save_file({"w": torch.zeros(2)}, str(folder / hub.LORA_WEIGHTS))
        config.update(pretrained_teacher_model=SD) if case == "lcm_lora" else config.update(
            pretrained_model_name_or_path=SD)
        config["use_lora"] = True
    else:
        cls = "StableDiffusionPipeline" if case == "sd_full" else "LatentConsistencyModelPipeline"
        index = {"_class_name": cls, "unet": ["diffusers", "UNet2DConditionModel"],
                 "text_encoder": ["transformers", "CLIPTextModel"], "vae": ["diffusers", "AutoencoderKL"]}
        (folder / "model_index.json").write_text(json.dumps(index))
        for name in ("unet", "vae"):
            _fake_component(folder, name)
        _fake_component(folder, "text_encoder", "model.safetensors")
        config["pretrained_model_name_or_path" if case == "sd_full" else "pretrained_teacher_model"] = SD
        config["num_ddim_timesteps"] = 50
    (folder / "training_config.json").write_text(json.dumps(config))
    record = {"dataset": "memorized-pairs", "num_images": 3, "num_examples": 30, "sha256": "cd" * 32, "note": "a|b",
              "entries": [{"source": f"{i}.png", "caption": f"caption {i}", "repeats": 10} for i in range(3)]}
    (folder / "training_set.json").write_text(json.dumps(record))
    text_to_image = case != "dmd"
    metrics = _synthetic_metrics(folder, tmp_path, f"{case} (4-step)", 4, clip=text_to_image)
    card, _ = hub.render_model_card(folder, metrics_path=metrics, repo_id=f"someone/{case}")
    data, text = card.data, card.content
    kind = {"dmd": "dmd_generator", "sd_full": "sd_memorization", "sd_lora": "sd_memorization"}.get(case, "lcm_student")
    assert hub.inspect_model_folder(folder).kind.name == kind
    assert data.library_name == "diffusers"
    assert data.pipeline_tag == ("text-to-image" if text_to_image else "unconditional-image-generation")
    if text_to_image:
        assert data.base_model == SD and data.license == "creativeml-openrail-m"
        assert f"[`{SD}`](https://huggingface.co/{SD})" in text
        assert {r.metric_type: r.metric_value for r in data.eval_results}["clip_score"] == 0.2875
    else:
        assert data.base_model is None and data.license == "other"
        assert "the parent's licence could not be read here" in text
    assert ("lora" in data.tags) == case.endswith("lora")
    assert ("load_lora_weights(\"someone/" in text) == case.endswith("lora")
    assert "| entries | 3 recorded images, 3 of them repeated, 3 with captions |" in text
    assert "| note | a\\|b |" in text  # a table cell stays one cell
    assert "Preprocessing:\n  resize 288, ImageNet normalization." in text
    assert {r.metric_type for r in data.eval_results} >= {"memorization_l2_ratio", "memorization_sscd", "sscd_p95"}
    assert "6.25% of this model's 4-step samples are near-copies" in text  # above the default 1% threshold
    assert {"dmd": "distribution matching distillation", "sd_full": "fine-tuned by diffusers-memdistill to memorize",
            "sd_lora": "only a LoRA of the UNet was trained", "lcm_full": "latent consistency model",
            "lcm_lora": "(LCM-LoRA)"}[case] in text
    out = hub.build_upload_folder(folder, str(tmp_path / "upload"), repo_id=f"someone/{case}", metrics_path=metrics)
    uploaded = sorted(os.path.relpath(os.path.join(r, f), out) for r, _, fs in os.walk(out) for f in fs)
    assert "README.md" in uploaded and "metrics.json" in uploaded and "training_set.json" in uploaded
    assert (hub.LORA_WEIGHTS in uploaded) == case.endswith("lora")


def test_dry_run_folder_loads_back_with_and_without_the_package(tiny_run, tmp_path):
    out = tmp_path / "upload"
    result = hub.push_to_hub_folder(str(tiny_run / "student"), "someone/tiny-cd", dry_run_dir=str(out),
                                    metrics_path=str(tiny_run / "report" / "metrics.json"), token=TOKEN)
    assert result == str(out)
    files = sorted(os.path.relpath(os.path.join(r, f), out) for r, _, fs in os.walk(out) for f in fs)
    assert files == sorted([
        "README.md", "metrics.json", "model_index.json", "pipeline_consistency.py", "scheduler/pipeline_consistency.py",
        "scheduler/scheduler_config.json", "training_config.json", "training_set.json", "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors", "figures/l2_ratio_histogram.png",
        "figures/memorized_student__1-step.png", "figures/memorized_student__2-step.png",
        "figures/samples_student__1-step.png", "figures/samples_student__2-step.png", "figures/samples_teacher.png"])
    assert (out / "metrics.json").read_bytes() == (tiny_run / "report" / "metrics.json").read_bytes()
    for name in files:
        assert TOKEN.encode() not in (out / name).read_bytes(), name
    assert json.loads((out / "training_config.json").read_text())["hub_token"] == "<redacted>"

    gen = lambda: [torch.Generator().manual_seed(s) for s in (3, 4)]  # noqa: E731
    original = ConsistencyStudentPipeline.from_pretrained(tiny_run / "student")
    expected = original(batch_size=2, generator=gen(), num_inference_steps=2, output_type="pt").images
    loaded = ConsistencyStudentPipeline.from_pretrained(out)
    torch.testing.assert_close(loaded(batch_size=2, generator=gen(), num_inference_steps=2, output_type="pt").images,
                               expected, rtol=0, atol=0)
    code = f"""
import torch
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained({str(out)!r}, trust_remote_code=True)
assert type(pipe).__name__ == "ConsistencyStudentPipeline", type(pipe)
g = [torch.Generator().manual_seed(s) for s in (3, 4)]
torch.save(pipe(batch_size=2, generator=g, num_inference_steps=2, output_type="pt").images, "remote.pt")
"""
    run_without_package(code, tmp_path)
    torch.testing.assert_close(torch.load(tmp_path / "remote.pt", weights_only=True), expected, rtol=0, atol=0)
    with pytest.raises(FileExistsError, match="not empty"):
        hub.push_to_hub_folder(str(tiny_run / "student"), "someone/tiny-cd", dry_run_dir=str(out))


def test_pickle_weights_and_incomplete_folders_are_refused(tiny_run, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_run / "teacher", model)
    (model / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ValueError, match=r"diffusion_pytorch_model.bin is a pickle-based weight file"):
        hub.build_upload_folder(model, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    (model / "unet" / "diffusion_pytorch_model.bin").unlink()
    (model / "pipeline_edm.py").unlink()
    with pytest.raises(FileNotFoundError, match="would not load with trust_remote_code"):
        hub.build_upload_folder(model, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_a_token_in_any_file_stops_the_folder(tiny_run, tmp_path, monkeypatch):
    model = tmp_path / "model"
    shutil.copytree(tiny_run / "teacher", model)
    record = json.loads((model / "training_set.json").read_text())
    (model / "training_set.json").write_text(json.dumps({**record, "note": f"made with {TOKEN}"}))
    with pytest.raises(RuntimeError, match="README.md, training_set.json would contain the Hugging Face token"):
        hub.build_upload_folder(model, str(tmp_path / "out" / "upload"), token=TOKEN)
    monkeypatch.setenv("HF_TOKEN", TOKEN)  # the logged-in token is looked for too
    with pytest.raises(RuntimeError, match="would contain the Hugging Face token"):
        hub.build_upload_folder(model, str(tmp_path / "out" / "upload"))
    assert os.listdir(tmp_path / "out") == []  # nothing partial is left behind
    assert TOKEN not in str(hub.redact_config({"hub_token": TOKEN}))


def test_redaction_of_secrets_in_configs_and_command_lines():
    config = {"hub_token": "x", "seed": 1, "nested": {"api_key": "y", "hub_token": None},
              "argv": ["--hub_token", "x", "--hub_token=x", "--seed", "1"]}
    assert hub.redact_config(config) == {
        "hub_token": "<redacted>", "seed": 1, "nested": {"api_key": "<redacted>", "hub_token": None},
        "argv": ["--hub_token", "<redacted>", "--hub_token=<redacted>", "--seed", "1"]}


class _FakeHub:
    """HfApi up to the network boundary: records the calls and checks what would be sent."""

    def __init__(self, monkeypatch, fail_commit=False):
        self.calls = []
        fake = self

        def create_repo(api, repo_id, **kwargs):
            fake.calls.append(("create_repo", repo_id, kwargs, api.token))
            return f"https://huggingface.co/{repo_id}"

        def create_branch(api, repo_id, **kwargs):
            fake.calls.append(("create_branch", repo_id, kwargs, api.token))

        def create_commit(api, repo_id, operations, **kwargs):
            # Everything is written before the one commit starts.
            fake.files = {op.path_in_repo: open(op.path_or_fileobj, "rb").read() for op in operations}
            fake.calls.append(("create_commit", repo_id, kwargs, api.token))
            if fail_commit:
                raise ConnectionError("connection reset during the upload")
            return type("CommitInfo", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/abc"})()

        def no_upload_folder(*args, **kwargs):
            raise AssertionError("upload_folder may split a folder into several commits")

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "create_branch", create_branch)
        monkeypatch.setattr(HfApi, "create_commit", create_commit)
        monkeypatch.setattr(HfApi, "upload_folder", no_upload_folder)


def _no_stored_token(monkeypatch, tmp_path):
    from huggingface_hub import constants

    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-tokens"))


def test_push_uploads_the_dry_run_folder_in_one_commit(tiny_run, tmp_path, monkeypatch, capsys):
    _no_stored_token(monkeypatch, tmp_path)
    monkeypatch.setenv("HF_TOKEN", TOKEN)  # huggingface_hub's environment login
    fake = _FakeHub(monkeypatch)
    metrics = str(tiny_run / "report" / "metrics.json")
    url = hub.push_to_hub_folder(str(tiny_run / "student"), "someone/tiny-cd", private=True, revision="v1",
                                 metrics_path=metrics)
    assert url == "https://huggingface.co/someone/tiny-cd/commit/abc"
    assert [c[0] for c in fake.calls] == ["create_repo", "create_branch", "create_commit"]
    assert fake.calls[0][1:3] == ("someone/tiny-cd", {"private": True, "exist_ok": True})
    assert fake.calls[1][1:3] == ("someone/tiny-cd", {"branch": "v1", "exist_ok": True})
    assert fake.calls[2][2]["revision"] == "v1" and all(c[3] == TOKEN for c in fake.calls)
    # The commit holds exactly the dry-run folder, and the token is in none of its files.
    dry = hub.push_to_hub_folder(str(tiny_run / "student"), "someone/tiny-cd", dry_run_dir=str(tmp_path / "dry"),
                                 metrics_path=metrics)
    expected = {os.path.relpath(os.path.join(r, f), dry).replace(os.sep, "/"): open(os.path.join(r, f), "rb").read()
                for r, _, fs in os.walk(dry) for f in fs}
    assert fake.files == expected
    assert not any(TOKEN.encode() in content for content in fake.files.values())
    assert TOKEN not in capsys.readouterr().out


def test_interrupted_upload_is_one_failed_commit(tiny_run, tmp_path, monkeypatch):
    fake = _FakeHub(monkeypatch, fail_commit=True)
    with pytest.raises(ConnectionError):
        hub.push_to_hub_folder(str(tiny_run / "student"), "someone/tiny-cd", token=TOKEN)
    assert [c[0] for c in fake.calls] == ["create_repo", "create_commit"]  # no second, partial commit


def test_no_token_fails_before_any_upload(tiny_run, tmp_path, monkeypatch, capsys):
    _no_stored_token(monkeypatch, tmp_path)
    fake = _FakeHub(monkeypatch)
    with pytest.raises(hub.HubTokenError, match="No Hugging Face token"):
        hub.push_to_hub_folder(str(tiny_run / "student"), "someone/tiny-cd")
    assert fake.calls == []
    assert cli_main(["push", "--model", str(tiny_run / "student"), "--repo_id", "someone/tiny-cd"]) == 2
    assert "No Hugging Face token" in capsys.readouterr().err and fake.calls == []


@pytest.mark.parametrize("repo_id", ["no-namespace", "a/b/c", "bad id/x", "user/-x-", "user/x..y", "/x"])
def test_bad_repo_id_is_refused(tiny_run, tmp_path, repo_id, capsys):
    with pytest.raises(ValueError, match="Repo id"):
        hub.push_to_hub_folder(str(tiny_run / "student"), repo_id, dry_run_dir=str(tmp_path / "x"))
    assert not (tmp_path / "x").exists()
    assert cli_main(["push", "--model", str(tiny_run / "student"), "--repo_id", repo_id, "--dry_run",
                     str(tmp_path / "x")]) == 2
    assert f"Repo id {repo_id!r}" in capsys.readouterr().err


def test_cli_lists_push_and_card(capsys):
    assert cli_main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "push" in out and "card" in out
    with pytest.raises(SystemExit):
        cli_main(["push", "--help"])
    assert "--dry_run" in capsys.readouterr().out


def test_card_command_writes_the_card_and_its_figures(tiny_run, tmp_path):
    output = tmp_path / "cards" / "tiny-demo.md"
    assert cli_main(["card", "--model", str(tiny_run / "student"), "--metrics",
                     str(tiny_run / "report" / "metrics.json"), "--output", str(output)]) == 0
    text = output.read_text()
    card = ModelCard.load(output)
    assert len(card.data.eval_results) == 8 and "](tiny-demo-figures/samples_teacher.png)" in text
    linked = [line.split("](")[1].split(")")[0] for line in text.splitlines() if "](tiny-demo-figures/" in line]
    assert linked and all((output.parent / rel).is_file() for rel in linked)
    assert cli_main(["card", "--model", str(tmp_path), "--output", str(output)]) == 2
