"""The family table against real transformers 5 models: every preset targets the intended linear layers of every
block and never the head; every family trains, saves and reloads (head and logits identical); decoders pad with
eos; a checkpoint's own classification head is kept, reordered or replaced as its labels say."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import pytest

from tune_app.spec import config as config_mod
from tune_app.spec.families import FAMILIES, family_for
from tune_app.spec.space import HYPERPARAMETERS
from tune_app.train.batching import collate
from tune_app.train.model import ModelSpec, build_model, mask_preparer
from tune_app.train.tokens import TokenizedSplit

# Written out by hand from each model's named_modules() (transformers 5), independently of the table's regexes:
# module paths inside one block, per preset. all_linear = attention + mlp.
_BERT = {"attention_qv": {"attention.self.query", "attention.self.value"},
         "attention": {"attention.self.query", "attention.self.key", "attention.self.value",
                       "attention.output.dense"},
         "mlp": {"intermediate.dense", "output.dense"}}
_LLAMA = {"attention_qv": {"self_attn.q_proj", "self_attn.v_proj"},
          "attention": {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"},
          "mlp": {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}}
EXPECTED = {
    "bert": ("bert.encoder.layer.{i}.", _BERT, {"classifier"}),
    "roberta": ("roberta.encoder.layer.{i}.", _BERT, {"classifier.dense", "classifier.out_proj"}),
    "xlm-roberta": ("roberta.encoder.layer.{i}.", _BERT, {"classifier.dense", "classifier.out_proj"}),
    "deberta-v2": ("deberta.encoder.layer.{i}.",
                   {"attention_qv": {"attention.self.query_proj", "attention.self.value_proj"},
                    "attention": {"attention.self.query_proj", "attention.self.key_proj",
                                  "attention.self.value_proj", "attention.output.dense"},
                    "mlp": {"intermediate.dense", "output.dense"}}, {"pooler.dense", "classifier"}),
    "distilbert": ("distilbert.transformer.layer.{i}.",
                   {"attention_qv": {"attention.q_lin", "attention.v_lin"},
                    "attention": {"attention.q_lin", "attention.k_lin", "attention.v_lin", "attention.out_lin"},
                    "mlp": {"ffn.lin1", "ffn.lin2"}}, {"pre_classifier", "classifier"}),
    "llama": ("model.layers.{i}.", _LLAMA, {"score"}),
    "mistral": ("model.layers.{i}.", _LLAMA, {"score"}),
    "qwen2": ("model.layers.{i}.", _LLAMA, {"score"}),
    "gemma": ("model.layers.{i}.", _LLAMA, {"score"}),
    "gpt2": ("transformer.h.{i}.", {"attention_qv": {"attn.c_attn"}, "attention": {"attn.c_attn", "attn.c_proj"},
                                    "mlp": {"mlp.c_fc", "mlp.c_proj"}}, {"score"}),
}
LAYERS = 2  # tests/tiny_models.TINY
LABELS = ["0", "1"]
TEXTS = ["Forest fire near La Ronge Sask. Canada", "I love fruits", "Flood warning: evacuate now!!",
         "what a lovely sunny day at the beach with friends and family", "ok", "Earthquake!",
         "Residents asked to shelter in place", "just had the best pizza of my life honestly"]


def test_every_family_has_a_test_row():
    assert set(EXPECTED) == set(FAMILIES)


def params(**overrides):
    return {**{k: hp.default for k, hp in HYPERPARAMETERS.items()}, **overrides}


def _base_names(model) -> dict[str, object]:
    """Module path (as in the plain transformers model) -> module, for a PEFT model."""
    prefix = "base_model.model."
    return {n[len(prefix):]: m for n, m in model.named_modules() if n.startswith(prefix)}


def lora_targets(model) -> set[str]:
    from peft.tuners.lora import LoraLayer

    return {n for n, m in _base_names(model).items() if isinstance(m, LoraLayer)}


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_presets_target_each_block_and_never_the_head(model_type, tiny_models):
    from peft.utils import ModulesToSaveWrapper

    path = tiny_models(model_type)
    block, parts, head = EXPECTED[model_type]
    for preset in ("attention_qv", "attention", "all_linear"):
        model, family, _ = build_model(ModelSpec(path, "k"), params(target_modules=preset), LABELS)
        names = parts["attention"] | parts["mlp"] if preset == "all_linear" else parts[preset]
        expected = {block.format(i=i) + n for i in range(LAYERS) for n in names}
        assert lora_targets(model) == expected, preset
        assert model.peft_config["default"].target_modules == family.target_modules(preset)
    # The head: trained in full, saved with the adapter, never LoRA-wrapped.
    modules = _base_names(model)
    wrapped = {n for n, m in modules.items() if isinstance(m, ModulesToSaveWrapper)}
    assert {n for n in modules if any(n == h or n.startswith(h + ".") for h in head)} & lora_targets(model) == set()
    assert all(any(h == w or h.startswith(w + ".") for w in wrapped) for h in head), (head, wrapped)


def _batch_logits(model, split, rows, pad_id):
    import torch

    ids, mask, _ = collate(split, np.asarray(rows), pad_id)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits.float().numpy()


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_family_trains_saves_and_reloads(model_type, tiny_models, tmp_path):
    """A short trial per family: padded batches > 1, a few AdamW steps, save, reload with PEFT's AutoPeft class:
    the head's weights and the logits come back identical."""
    import torch
    from peft import AutoPeftModelForSequenceClassification
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    path = tiny_models(model_type)
    model, family, pad_id = build_model(ModelSpec(path, "k"), params(target_modules="all_linear",
                                                                     learning_rate=5e-3), LABELS)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if family.decoder:  # pad = eos (the fixtures' decoder tokenizers have none; Qwen2's class defaults to eos)
        assert pad_id == tokenizer.eos_token_id and tokenizer.pad_token in (None, tokenizer.eos_token)
    assert model.config.pad_token_id == pad_id
    assert model.config.id2label == {0: "0", 1: "1"} and model.config.label2id == {"0": 0, "1": 1}

    split = TokenizedSplit.from_lists(tokenizer(TEXTS)["input_ids"], np.array([1, 0, 1, 0, 0, 1, 1, 0]))
    assert len(set(split.lengths.tolist())) > 1  # rows of different lengths: the batch really pads
    # A padded row scores as it does alone: the pad token and its mask are right for this family.
    model.eval()
    together = _batch_logits(model, split, range(len(split)), pad_id)
    alone = np.concatenate([_batch_logits(model, split, [i], pad_id) for i in range(len(split))])
    np.testing.assert_allclose(together, alone, atol=1e-4)

    head_before = {n: p.detach().clone() for n, p in model.named_parameters() if "modules_to_save" in n}
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    for _ in range(3):
        ids, mask, labels = collate(split, np.arange(len(split)), pad_id)
        loss = torch.nn.functional.cross_entropy(model(input_ids=ids, attention_mask=mask).logits, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    head_after = {n: p.detach() for n, p in model.named_parameters() if "modules_to_save" in n}
    assert head_before and any(not torch.equal(head_before[n], head_after[n]) for n in head_before)  # head trains

    model.eval()
    logits = _batch_logits(model, split, range(len(split)), pad_id)
    model.save_pretrained(tmp_path / "adapter")
    reloaded = AutoPeftModelForSequenceClassification.from_pretrained(
        tmp_path / "adapter", num_labels=2, pad_token_id=pad_id).eval()
    for name, value in head_after.items():
        torch.testing.assert_close(dict(reloaded.named_parameters())[name], value, rtol=0, atol=0)
    np.testing.assert_allclose(_batch_logits(reloaded, split, range(len(split)), pad_id), logits, atol=1e-5)


class HostRead(AssertionError):
    """A tensor's value was read on the host during a forward/backward (on a GPU: a sync)."""


@contextlib.contextmanager
def no_host_reads(monkeypatch):
    """Any tensor -> Python value conversion inside raises HostRead: bool(t) behind an `if`, t.item(), float(t)..."""
    import torch

    def refuse(*_args, **_kwargs):
        raise HostRead("a tensor's value was read on the host")

    with monkeypatch.context() as patch:
        for name in ("__bool__", "__float__", "__int__", "__index__", "item", "tolist"):
            patch.setattr(torch.Tensor, name, refuse)
        yield


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_training_forward_never_reads_a_tensor_on_the_host(model_type, tiny_models, monkeypatch):
    """The mask a training step hands the model (trial.mask_preparer) gives the same logits as the plain 2D mask,
    and a training forward + backward with it (dropout on) reads no tensor value on the host (on a GPU, each read
    waits for the queue). The 2D mask itself does read (transformers checks for padding): the check can fail."""
    import torch
    from transformers import AutoTokenizer

    path = tiny_models(model_type)
    model, family, pad_id = build_model(ModelSpec(path, "k"), params(lora_dropout=0.1), LABELS)
    split = TokenizedSplit.from_lists(AutoTokenizer.from_pretrained(path)(TEXTS)["input_ids"], np.zeros(8, int))
    ids, mask, _ = collate(split, np.arange(len(split)), pad_id)
    prepared = mask_preparer(model, family, "fp32")(mask)
    assert prepared.dim() == (4 if family.prepared_mask else 2)
    model.train()
    with no_host_reads(monkeypatch):
        model(input_ids=ids, attention_mask=prepared).logits.sum().backward()
    if family.prepared_mask:
        with pytest.raises(HostRead), no_host_reads(monkeypatch):
            model(input_ids=ids, attention_mask=mask)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, attention_mask=prepared).logits,
                                   model(input_ids=ids, attention_mask=mask).logits, rtol=1e-5, atol=1e-5)


def test_prepared_mask_leaves_a_sliding_window_to_transformers(tiny_models):
    """A batch wider than a sliding attention window keeps its 2D mask: the window is transformers' to apply."""
    import torch

    model, family, _ = build_model(ModelSpec(tiny_models("mistral"), "k"), params(), LABELS)
    model.config.sliding_window = 16
    prepare = mask_preparer(model, family, "bf16")
    narrow, wide = torch.ones(2, 16, dtype=torch.long), torch.ones(2, 24, dtype=torch.long)
    assert prepare(narrow).shape == (2, 1, 16, 16) and prepare(narrow).dtype == torch.bfloat16
    assert prepare(wide) is wide


def test_lora_space_options_reach_the_lora_config(tiny_models):
    """lora_alpha_ratio x rank becomes lora_alpha; use_rslora, dropout and the preset reach PEFT's LoraConfig."""
    path = tiny_models("llama")
    model, family, _ = build_model(ModelSpec(path, "k"), params(lora_rank=4, lora_alpha=99, lora_alpha_ratio=2.0,
                                                                use_rslora=True, lora_dropout=0.07,
                                                                target_modules="attention"), LABELS)
    lora = model.peft_config["default"]
    assert (lora.r, lora.lora_alpha, lora.use_rslora, lora.lora_dropout) == (4, 8.0, True, 0.07)
    assert lora.target_modules == family.target_modules("attention")
    assert set(lora.modules_to_save) >= {"score"}
    # rsLoRA's scale is alpha / sqrt(r), not alpha / r.
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == pytest.approx(8.0 / 4 ** 0.5)


def test_gpt2_conv1d_is_adapted_as_fan_in_fan_out(tiny_models):
    path = tiny_models("gpt2")
    model, family, _ = build_model(ModelSpec(path, "k"), params(), LABELS)
    assert family.fan_in_fan_out and model.peft_config["default"].fan_in_fan_out
    layer = model.base_model.model.transformer.h[0].attn.c_attn
    assert layer.fan_in_fan_out


def test_target_modules_preset_without_such_a_family_is_an_error():
    with pytest.raises(ValueError, match="known: bert, roberta"):
        family_for("mamba")


# ------------------------------------------------------------------------------------------- checkpoint heads

SENTIMENT = ["negative", "neutral", "positive"]


@pytest.fixture(scope="module")
def sentiment_checkpoint(tiny_models):
    """A tiny roberta saved as a 3-class classifier (negative/neutral/positive), like
    cardiffnlp/twitter-roberta-base-sentiment-latest."""
    return tiny_models("roberta", head_labels=SENTIMENT)


def _saved_out_proj(path):
    from safetensors.torch import load_file

    weights = load_file(f"{path}/model.safetensors")
    return weights["classifier.out_proj.weight"], weights["classifier.out_proj.bias"]


def _out_proj(model):
    layer = model.base_model.model.classifier.modules_to_save["default"].out_proj
    return layer.weight.detach(), layer.bias.detach()


def test_checkpoint_head_with_the_same_labels_is_kept(sentiment_checkpoint, capsys):
    import torch

    model, _, _ = build_model(ModelSpec(sentiment_checkpoint, "k"), params(), SENTIMENT)
    weight, bias = _out_proj(model)
    saved_w, saved_b = _saved_out_proj(sentiment_checkpoint)
    torch.testing.assert_close(weight, saved_w, rtol=0, atol=0)
    torch.testing.assert_close(bias, saved_b, rtol=0, atol=0)
    assert "keeping the checkpoint's trained 3-label head" in capsys.readouterr().out
    assert model.config.id2label == dict(enumerate(SENTIMENT))


def test_checkpoint_head_rows_follow_the_data_label_order(sentiment_checkpoint, capsys):
    import torch

    order = ["positive", "negative", "neutral"]
    model, _, _ = build_model(ModelSpec(sentiment_checkpoint, "k"), params(), order)
    weight, bias = _out_proj(model)
    saved_w, saved_b = _saved_out_proj(sentiment_checkpoint)
    rows = [SENTIMENT.index(n) for n in order]
    torch.testing.assert_close(weight, saved_w[rows], rtol=0, atol=0)
    torch.testing.assert_close(bias, saved_b[rows], rtol=0, atol=0)
    assert "rows reordered" in capsys.readouterr().out
    assert model.config.id2label == dict(enumerate(order))


@pytest.mark.parametrize("labels", [["0", "1"], ["anger", "joy", "sadness"]], ids=["other-size", "other-names"])
def test_checkpoint_head_with_other_labels_is_replaced(sentiment_checkpoint, labels, capsys):
    model, _, _ = build_model(ModelSpec(sentiment_checkpoint, "k"), params(), labels)
    weight, _ = _out_proj(model)
    saved_w, _ = _saved_out_proj(sentiment_checkpoint)
    assert weight.shape[0] == len(labels)
    if weight.shape == saved_w.shape:
        assert not np.allclose(weight.numpy(), saved_w.numpy())  # re-initialised, not the old classes' rows
    out = capsys.readouterr().out
    assert f"replacing the checkpoint's 3-label head (negative, neutral, positive) with a fresh {len(labels)}-label" \
           in out


def test_evaluate_baseline_scores_a_checkpoint_head_by_label_name(sentiment_checkpoint):
    """`evaluate --baseline CHECKPOINT` loads the checkpoint as a trial would: its sentiment head's classes line up
    with the bundle's labels by name, whatever their order."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tune_app.bundle.format import Bundle
    from tune_app.bundle.predict import baseline_probs, baseline_spec

    order = ["positive", "negative", "neutral"]
    bundle = Bundle(Path("unused"), {"inference": {"precision": "fp32", "batch_size": 4}, "data": {"max_length": 32}},
                    {"label_names": order})
    probs, note = baseline_probs(baseline_spec(sentiment_checkpoint), bundle, TEXTS, "cpu")
    own = AutoModelForSequenceClassification.from_pretrained(sentiment_checkpoint).eval()
    with torch.no_grad():
        own_probs = torch.softmax(own(**AutoTokenizer.from_pretrained(sentiment_checkpoint)(
            TEXTS, padding=True, return_tensors="pt")).logits, -1).numpy()
    np.testing.assert_allclose(probs, own_probs[:, [SENTIMENT.index(n) for n in order]], atol=1e-5)
    assert "keeping the checkpoint's trained 3-label head" in note and "rows reordered" in note


# ------------------------------------------------------------------------------------------- unknown family


def _study(tmp_path, checkpoint, **model):
    import yaml

    data = tmp_path / "d.csv"
    data.write_text("text,label\n" + "".join(f"{w},{i % 2}\n" for i, w in enumerate("abcdefghij")))
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({"name": "s", "data": {"source": str(data)},
                                    "models": {"m": {"checkpoint": str(checkpoint), **model}}}))
    return path


def test_unknown_local_family_fails_validation_with_the_way_out(tmp_path, capsys):
    from tune_app import cli

    folder = tmp_path / "mamba"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    for name in ("model.safetensors", "tokenizer.json"):  # a whole model folder, as far as validate looks
        (folder / name).write_text("{}")
    with pytest.raises(config_mod.ConfigError) as error:
        config_mod.load(_study(tmp_path, folder))
    message = str(error.value)
    assert "models.m.checkpoint: model_type 'mamba' is not in tune_app's family table" in message
    assert all(name in message for name in FAMILIES)
    assert "models.m.target_modules: [q_proj, v_proj]" in message
    # The CLI: exit 2 with the same message, before anything runs.
    assert cli.main(["validate", str(_study(tmp_path, folder))]) == 2
    assert "not in tune_app's family table" in capsys.readouterr().err
    # Explicit targets make any architecture tunable.
    config_mod.load(_study(tmp_path, folder, target_modules=["in_proj"]))


def test_known_local_family_validates(tmp_path, tiny_models):
    cfg = config_mod.load(_study(tmp_path, tiny_models("qwen2")))
    assert list(cfg.models) == ["m"]
