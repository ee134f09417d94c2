"""Half-precision bases (models.<m>.dtype: bf16 or fp16) without autocast, as on a CPU-only cluster or under
`train.precision: fp32` on a GPU: the base stays in half precision while its LoRA layers and head train in fp32
(tune_app.train.precision.train_in_fp32), and a trial trains, evaluates, checkpoints, packs, exports and predicts.

Tiny random-weight models, real PEFT, CPU (fp16 too: torch computes every op these models use in fp16 on a CPU,
slowly but correctly). Every context here is `train.precision: fp32`, so the tests mean the same on a GPU."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil

import numpy as np
import pytest
import torch

from tests.test_trial import NO_DROPOUT, make_config, make_context, run_fit
from tune_app.train import memory
from tune_app.train.precision import HOOKS

HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


def half_context(checkpoint: str, dtype: str, epochs: int, **sizes):
    """make_context (fp32, eager, no autocast) with the base loaded in `dtype`."""
    from transformers import AutoConfig

    ctx = make_context(checkpoint, epochs, vocab=AutoConfig.from_pretrained(checkpoint).vocab_size, **sizes)
    return dataclasses.replace(ctx, models={"m": dataclasses.replace(ctx.models["m"], dtype=dtype)})


def tiny(tiny_models, family: str) -> str:
    return tiny_models(family, **(NO_DROPOUT if family == "bert" else {}))


def hooked(model) -> list[str]:
    return [name for name, module in model.named_modules() if HOOKS in module.__dict__]


# --------------------------------------------------------------------------------------------- a trial


@pytest.mark.parametrize("dtype", list(HALF))
@pytest.mark.parametrize("family", ["bert", "llama"])
def test_a_half_precision_base_trains_and_evaluates_without_autocast(tiny_models, family, dtype):
    """The fp32 head copy takes the base's half-precision hidden states (it used to fail: 'expected m1 and m2 to
    have the same dtype'); the trial learns about what the same trial over an fp32 base learns, its base stays in
    half precision, and what it saves (adapter and head) is fp32."""
    checkpoint = tiny(tiny_models, family)
    config = make_config(learning_rate=1e-2, batch_size=8, lora_rank=8, lr_scheduler="constant")
    memory.clear()
    epochs = run_fit(config, half_context(checkpoint, dtype, epochs=3))
    base = memory._kept.base.model  # the base the trial trained over, kept for the next trial
    assert base.dtype == HALF[dtype] and not hooked(base)
    memory.clear()
    reference = run_fit(config, half_context(checkpoint, "fp32", epochs=3))

    losses = [m["train_loss"] for m, _, _ in epochs]
    assert all(math.isfinite(m[k]) for m, _, _ in epochs for k in ("train_loss", "eval_loss")), losses
    assert losses[-1] < losses[0], losses
    assert epochs[0][0]["autocast"] == "fp32"
    # The same learning as over the fp32 base, up to half precision's rounding of the frozen weights.
    assert losses[0] == pytest.approx(reference[0][0]["train_loss"], abs=0.03), (losses, reference[0][0])
    assert epochs[-1][0]["accuracy"] >= reference[-1][0]["accuracy"] - 0.1
    first, last = epochs[0][1], epochs[-1][1]
    assert all(t.dtype == torch.float32 for t in last.values())
    assert all(last[k].abs().sum() > 0 for k in last if "lora_B" in k)  # B starts at zero: it trained
    head = [k for k in last if "lora_" not in k]
    assert head and any(not torch.equal(first[k], last[k]) for k in head)  # the head trained on


@pytest.mark.parametrize("lora_bias", ["all", "lora_only"])
def test_biases_trained_over_a_half_precision_base_stay_fp32(tiny_models, lora_bias):
    """lora_bias trains the base's own biases: they train in fp32 while their layers compute in bf16 (a bf16 view
    of each during the forward); the kept base gets its bf16 biases back and loses the views, so the next trial
    over it trains exactly what the first did."""
    from tune_app.train.model import trial_base

    memory.clear()
    ctx = half_context(tiny_models("bert", **NO_DROPOUT), "bf16", epochs=1)
    config = make_config(learning_rate=1e-2, batch_size=8, lora_bias=lora_bias)
    first = run_fit(config, ctx)
    metrics, adapter, _ = first[0]
    assert math.isfinite(metrics["train_loss"]) and math.isfinite(metrics["eval_loss"])
    biases = {k: t for k, t in adapter.items() if k.endswith(".bias") and "classifier" not in k and "lora_" not in k}
    assert biases and all(t.dtype == torch.float32 for t in biases.values())

    kept = memory._kept.base.model
    assert not hooked(kept)
    torch.manual_seed(ctx.seed)
    fresh = trial_base(ctx.models["m"], ctx.label_names).model.state_dict()
    state = kept.state_dict()
    for name, tensor in fresh.items():
        torch.testing.assert_close(state[name].cpu(), tensor, rtol=0, atol=0, msg=name)  # dtype included
    trained = {k.removeprefix("base_model.model.").replace(".base_layer.", "."): t for k, t in biases.items()}
    assert any(not torch.equal(t.to(torch.bfloat16), fresh[k]) for k, t in trained.items())  # they trained

    second = run_fit(config, ctx)
    exact = 0 if not torch.cuda.is_available() else None  # GPU backward kernels may sum in any order
    assert second[0][0]["base_reused"] is True
    assert second[0][0]["train_loss"] == pytest.approx(metrics["train_loss"], rel=exact, abs=exact)
    for name, tensor in adapter.items():
        torch.testing.assert_close(second[0][1][name], tensor, rtol=exact, atol=exact)
    memory.clear()


def test_autocast_and_fp32_bases_compute_as_before(tiny_models):
    """The policy changes nothing where autocast casts (its hooks stand aside: same logits with and without them)
    nor over an fp32 base (no hooks at all)."""
    from tune_app.train.model import ModelSpec, build_model
    from tune_app.train.precision import remove_hooks, train_in_fp32

    checkpoint = tiny_models("qwen2")  # q, k and v have biases: lora_bias all trains them
    ids = torch.randint(3, 300, (3, 12))
    config = make_config(lora_bias="all", target_modules="all_linear")
    model, family, _ = build_model(ModelSpec(checkpoint, "k", dtype="bf16"), config, ["0", "1"])
    train_in_fp32(model, family)
    assert {name.rsplit(".", 1)[-1] for name in hooked(model)} == {"default", "base_layer"}  # head copy, biases
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        hooks_on = model(input_ids=ids).logits
        remove_hooks(model)
        assert not hooked(model)
        torch.testing.assert_close(model(input_ids=ids).logits, hooks_on, rtol=0, atol=0)

    model, family, _ = build_model(ModelSpec(checkpoint, "k"), config, ["0", "1"])
    train_in_fp32(model, family)
    assert not hooked(model) and all(p.dtype == torch.float32 for p in model.parameters())


# --------------------------------------------------------------------------------------------- packed trials


def test_packed_trials_train_over_a_half_precision_base(tiny_models):
    """tune.pack over a bf16 base: each trial's head copy takes its rows of the shared base's bf16 hidden states,
    and the trials train exactly what each trains alone (on a CPU; with a GPU, the solo runs train there and the
    pack on the CPU, so bf16 rounds them apart)."""
    from tests.test_pack import TRIALS, assert_same_training, run_pack, solo_runs

    ctx = half_context(tiny_models("llama"), "bf16", epochs=2, n_train=48, n_val=16)
    configs = {name: make_config(**params) for name, params in TRIALS.items() if name != "c"}
    packed, solo = run_pack(configs, ctx), solo_runs(configs, ctx)
    for name in configs:
        assert all(t.dtype == torch.float32 for _, adapter, _ in packed[name] for t in adapter.values())
        if not torch.cuda.is_available():
            assert_same_training(solo[name], packed[name])
            continue
        for (metrics, _, _), (p_metrics, _, _) in zip(solo[name], packed[name], strict=True):
            assert p_metrics["train_loss"] == pytest.approx(metrics["train_loss"], abs=2e-2)
    memory.clear()


# --------------------------------------------------------------------------------------------- bundles


@pytest.mark.parametrize("dtype", list(HALF))
@pytest.mark.parametrize("family", ["bert", "llama"])
def test_a_half_precision_bundle_scores_what_its_trial_evaluated(tiny_models, tmp_path, family, dtype):
    """A bundle of such a trial (its checkpoint's adapter files, a manifest naming the half-precision base) loads
    through predict.load_classifier as the trial built its model (base in half precision, adapter and head in
    fp32) and scores the validation rows exactly as the trial's last evaluation did."""
    from transformers import AutoTokenizer

    from tune_app.bundle.format import open_bundle
    from tune_app.bundle.predict import load_classifier
    from tune_app.train.evaluation import evaluate
    from tune_app.train.trainable import fit

    checkpoint = tiny(tiny_models, family)
    ctx = half_context(checkpoint, dtype, epochs=1)
    config = make_config(learning_rate=1e-2, batch_size=8)
    bundle = tmp_path / "bundle"
    reported = {}

    def report(metrics, directory):
        reported.update(metrics)
        shutil.copytree(directory, bundle)

    memory.clear()
    fit(config, ctx, report=report, threads=1)
    memory.clear()
    AutoTokenizer.from_pretrained(checkpoint).save_pretrained(bundle)
    hyperparameters = {k: v for k, v in config.items() if k != "model"}
    (bundle / "bundle.json").write_text(json.dumps({
        "base": {"checkpoint": checkpoint, "dtype": dtype, "target_modules": None},
        "hyperparameters": hyperparameters, "data": {"text_column": "text", "label_column": "label",
                                                     "max_length": ctx.max_length},
        "inference": {"batch_size": ctx.eval_batch_size, "precision": ctx.precision}, "decision": {"threshold": None}}))
    (bundle / "labels.json").write_text(json.dumps({"label_names": ctx.label_names}))

    clf = load_classifier(open_bundle(bundle))  # on the device the trial trained on
    trainable = {n: p for n, p in clf.model.named_parameters() if p.requires_grad}
    assert clf.model.get_base_model().dtype == HALF[dtype]
    assert trainable and all(p.dtype == torch.float32 for p in trainable.values())
    val = ctx.data_refs["toy"].val
    metrics, predictions = evaluate(clf.model, val, clf.pad_id, ctx.eval_batch_size, clf.device, clf.autocast,
                                    np.asarray(ctx.class_weights, dtype=np.float32))
    np.testing.assert_array_equal(predictions, np.load(os.path.join(bundle, "val_predictions.npy")))
    for key in ("eval_loss", "f1", "accuracy"):
        assert metrics[key] == pytest.approx(reported[key], rel=1e-6, abs=1e-7), key


@pytest.mark.slow
def test_a_half_precision_study_runs_exports_and_predicts(ray_session, tiny_models, tweets_csv, tmp_path, capsys):
    """End to end, as search_spaces/disaster_tweets.yaml runs Llama/Mistral (dtype: bf16) on a CPU-only cluster:
    `tune-app run` trains and exports the best (its round trip within tolerance), `export --merge` merges it,
    `predict` and `evaluate --baseline base` load it and its bf16 base."""
    import pandas as pd

    from tune_app import cli

    data = tmp_path / "tweets.csv"
    pd.read_csv(tweets_csv).sample(n=120, random_state=0).to_csv(data, index=False)
    study = tmp_path / "study.yaml"
    study.write_text(f"""
name: half
data: {{source: {data}, text: text, label: target, limit: 120, max_length: 32}}
models:
  tiny: {{checkpoint: {tiny_models("llama")}, cpu: 1, dtype: bf16}}
train: {{epochs: 1, batch_size: 16, eval_batch_size: 16, precision: fp32}}
tune: {{num_samples: 1, seed: 0, asha: {{enabled: false}}}}
output_dir: {tmp_path / 'runs'}
wandb: {{mode: disabled}}
""")
    assert cli.main(["run", str(study)]) == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    best = run_dir / "best"
    metrics = json.loads((best / "metrics.json").read_text())
    assert metrics["round_trip_ok"], metrics
    assert metrics["reproduced_by_bundle"]["eval_loss"] == pytest.approx(metrics["reported_by_trial"]["eval_loss"],
                                                                          abs=1e-5)
    assert json.loads((best / "bundle.json").read_text())["base"]["dtype"] == "bf16"

    merged = tmp_path / "merged"
    assert cli.main(["export", str(run_dir), "--out", str(merged), "--merge"]) == 0
    assert json.loads((merged / "metrics.json").read_text())["merged"]["same_predictions"] == metrics["rows"]
    capsys.readouterr()
    assert cli.main(["predict", str(best), "--text", "Forest fire near La Ronge", "--text", "I love fruits"]) == 0
    assert capsys.readouterr().out.count('"label"') == 2
    labelled = tmp_path / "labelled.csv"
    pd.DataFrame({"text": ["Forest fire near La Ronge", "I love fruits"], "target": [1, 0]}).to_csv(labelled,
                                                                                                   index=False)
    assert cli.main(["evaluate", str(best), "--data", str(labelled), "--baseline", "base"]) == 0
    assert "baseline" in capsys.readouterr().out
