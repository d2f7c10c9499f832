"""HF ⇄ jaxdyn conversion against transformers (docs/conversion.md), no network.

Each tiny random HF model is built once per module with every parameter perturbed (HF's init
would hide a misplaced bias or a wrong transpose), saved with `save_pretrained`, and then
imported, compared, generated from, exported and reloaded.
"""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util
from safetensors.numpy import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

import conversion
from conversion import mapping, model_card
from conversion.__main__ import main as cli
from jaxdyn.cli.common import load_for_inference
from jaxdyn.decode.generate import generate
from jaxdyn.model import build

pytestmark = pytest.mark.parity  # equality against a reference

LLAMA3 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=32)
VARIANTS = {  # name: (model_type, config overrides, scanned layers on import)
    "qwen2_tied": ("qwen2", dict(rope_theta=1e6, tie_word_embeddings=True), True),
    "qwen2_untied": ("qwen2", dict(rope_theta=1e6, tie_word_embeddings=False), False),
    "llama3": ("llama", dict(rope_scaling=LLAMA3, attention_bias=False), True),
    "llama3_bias": ("llama", dict(rope_scaling=LLAMA3, attention_bias=True, mlp_bias=True),
                    False),
    "neox_r25_parallel": ("gpt_neox", dict(rotary_pct=0.25, use_parallel_residual=True), True),
    "neox_r100_sequential": ("gpt_neox", dict(rotary_pct=1.0, use_parallel_residual=False),
                             False),
}
B, T, NEW = 2, 17, 20


def make_hf(model_type: str, **kw):
    torch.manual_seed(0)
    base = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=128, max_position_embeddings=128, bos_token_id=None,
                eos_token_id=None, pad_token_id=None)
    if model_type == "gpt_neox":
        base.update(intermediate_size=256, hidden_act="gelu")
    else:
        base.update(num_key_value_heads=2)
    base.update(kw)
    hf_cfg = AutoConfig.for_model(model_type, **base)
    model = AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="eager",
                                             dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:  # weights and every bias (HF initialises biases to 0)
                p.normal_(0, 0.02)
    return model.eval()


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """name -> (torch model, saved folder)."""
    out = {}
    for name, (mt, kw, _) in VARIANTS.items():
        model = make_hf(mt, **kw)
        d = str(tmp_path_factory.mktemp(name))
        model.save_pretrained(d)
        out[name] = (model, d)
    return out


@pytest.fixture(scope="module")
def imported(hf):
    return {n: conversion.from_hf(d, scan_layers=VARIANTS[n][2]) for n, (_, d) in hf.items()}


def ids_and_positions():
    ids = np.random.RandomState(0).randint(0, 256, (B, T))
    return ids, np.broadcast_to(np.arange(T), (B, T)).copy()


def hf_logits(model, ids, pos) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(ids), position_ids=torch.tensor(pos)).logits.float().numpy()


def jx_logits(cfg, params, ids, pos) -> np.ndarray:
    return np.asarray(build(cfg).apply({"params": params}, jnp.asarray(ids),
                                       jnp.asarray(pos)).logits)


def flat(params):
    return traverse_util.flatten_dict(params, sep="/")


def hf_tensors(folder: str) -> dict[str, np.ndarray]:
    files = [f for f in os.listdir(folder) if f.endswith(".safetensors")]
    return {k: v for f in files for k, v in load_file(os.path.join(folder, f)).items()}


@pytest.mark.parametrize("name", VARIANTS)
def test_logits_match_transformers(hf, imported, name):
    model, _ = hf[name]
    cfg, params = imported[name]
    assert ("layers" in params) == cfg.scan_layers == VARIANTS[name][2]
    ids, pos = ids_and_positions()
    diff = np.abs(jx_logits(cfg, params, ids, pos) - hf_logits(model, ids, pos)).max()
    assert diff <= 1e-4, f"{name}: max |Δ| {diff}"


# One per family plus the variants whose maths differ most (llama3 RoPE with biases, both NeoX
# residual modes); the other two variants differ only in tensors the logits test covers.
@pytest.mark.parametrize("name", ["qwen2_tied", "llama3_bias", "neox_r25_parallel",
                                  "neox_r100_sequential"])
def test_greedy_matches_transformers_generate(hf, imported, name):
    """A left-padded batch (prompts of 9 and 5 tokens): 20 greedy tokens, identical."""
    model, _ = hf[name]
    cfg, params = imported[name]
    rs = np.random.RandomState(1)
    prompts = [rs.randint(0, 256, 9).tolist(), rs.randint(0, 256, 5).tolist()]
    ours = generate(cfg, params, prompts, NEW).tokens
    P = max(map(len, prompts))
    ids = torch.tensor([[0] * (P - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW,
                             do_sample=False, pad_token_id=0, eos_token_id=None)
    assert ours == ref[:, P:].tolist()


@pytest.mark.parametrize("name", VARIANTS)
def test_round_trip_bytes_and_logits(hf, imported, name, tmp_path):
    model, d = hf[name]
    cfg, params = imported[name]
    rep = conversion.to_hf(cfg, params, str(tmp_path / "out"))
    orig, back = hf_tensors(d), hf_tensors(str(tmp_path / "out"))
    if "lm_head.weight" in orig and cfg.family == "gpt_neox":  # export writes embed_out
        orig["embed_out.weight"] = orig.pop("lm_head.weight")
    orig = {k: v for k, v in orig.items() if not mapping.is_ignored(k)}
    assert set(back) == set(orig) and rep.tensors == len(orig) and not rep.dropped
    for k in orig:
        assert back[k].dtype == orig[k].dtype and back[k].tobytes() == orig[k].tobytes(), k
    hf_cfg = json.load(open(tmp_path / "out" / "config.json"))
    assert hf_cfg["rope_theta"] == hf_cfg["rope_parameters"]["rope_theta"] == cfg.rope_theta
    if cfg.rope_type == "llama3":
        assert hf_cfg["rope_scaling"]["factor"] == hf_cfg["rope_parameters"]["factor"] == 8.0
    index = json.load(open(tmp_path / "out" / "model.safetensors.index.json"))
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in orig.values())
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"),
                                                    attn_implementation="eager")
    ids, pos = ids_and_positions()
    assert np.abs(hf_logits(reloaded, ids, pos) - hf_logits(model, ids, pos)).max() <= 1e-5


def test_sharded_index_import_and_export(hf, imported, tmp_path):
    model, _ = hf["llama3_bias"]
    model.save_pretrained(str(tmp_path / "sharded"), max_shard_size="40KB")
    assert os.path.exists(tmp_path / "sharded" / "model.safetensors.index.json")
    cfg, params = conversion.from_hf(str(tmp_path / "sharded"), scan_layers=False)
    ref = flat(imported["llama3_bias"][1])
    assert all(np.array_equal(v, ref[k]) for k, v in flat(params).items()) and \
        set(flat(params)) == set(ref)
    rep = conversion.to_hf(cfg, params, str(tmp_path / "out"), max_shard_size="40KB")
    assert len(rep.files) > 2
    for f in rep.files:  # at most 40 KB per shard, unless one tensor alone is larger
        t = load_file(str(tmp_path / "out" / f))
        assert len(t) == 1 or sum(v.nbytes for v in t.values()) <= 40_000, f
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"),
                                                    attn_implementation="eager")
    ids, pos = ids_and_positions()
    assert np.abs(hf_logits(reloaded, ids, pos) - hf_logits(model, ids, pos)).max() <= 1e-5


def test_bf16_checkpoint(hf, tmp_path):
    """fp32 params from a bf16 file match HF loading the same file upcast; bf16 round trip."""
    model, _ = hf["qwen2_untied"]
    d = str(tmp_path / "bf16")
    model.to(torch.bfloat16).save_pretrained(d)
    model.to(torch.float32)
    cfg, params = conversion.from_hf(d, dtype="float32")
    assert {v.dtype for v in flat(params).values()} == {np.dtype("float32")}
    upcast = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32,
                                                  attn_implementation="eager")
    ids, pos = ids_and_positions()
    assert np.abs(jx_logits(cfg, params, ids, pos) - hf_logits(upcast, ids, pos)).max() <= 1e-4
    cfg16, p16 = conversion.from_hf(d, dtype="bfloat16")
    conversion.to_hf(cfg16, p16, str(tmp_path / "out"))
    orig, back = hf_tensors(d), hf_tensors(str(tmp_path / "out"))
    assert set(orig) == set(back)
    assert all(back[k].dtype == orig[k].dtype and back[k].tobytes() == orig[k].tobytes()
               for k in orig)
    assert json.load(open(tmp_path / "out" / "config.json"))["dtype"] == "bfloat16"


def test_pytorch_bin_checkpoint(hf, imported, tmp_path):
    model, d = hf["neox_r25_parallel"]
    shutil.copy(os.path.join(d, "config.json"), tmp_path)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["gpt_neox.layers.0.attention.rotary_emb.inv_freq"] = torch.ones(2)  # an ignored buffer
    torch.save(sd, tmp_path / "pytorch_model.bin")
    cfg, params, rep = conversion.from_hf(str(tmp_path), return_report=True)
    ref = flat(imported["neox_r25_parallel"][1])
    assert all(np.array_equal(v, ref[k]) for k, v in flat(params).items())
    assert rep.ignored == ["gpt_neox.layers.0.attention.rotary_emb.inv_freq"]


def _edit(src: str, dst, tensors=None, config=None) -> str:
    """A copy of an HF folder with its tensors and/or config.json changed."""
    shutil.copytree(src, dst)
    if tensors:
        t = load_file(os.path.join(dst, "model.safetensors"))
        tensors(t)
        save_file(t, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    if config:
        c = json.load(open(os.path.join(dst, "config.json")))
        config(c)
        json.dump(c, open(os.path.join(dst, "config.json"), "w"))
    return str(dst)


def test_bad_checkpoints_raise_named_errors(hf, tmp_path):
    d = hf["qwen2_untied"][1]
    q = "model.layers.1.self_attn.q_proj.weight"
    cases = [
        (dict(tensors=lambda t: t.pop(q)), conversion.MissingTensorError, q),
        (dict(tensors=lambda t: t.update(stray=np.zeros(3, np.float32))),
         conversion.UnconsumedTensorError, "stray"),
        (dict(tensors=lambda t: t.update({q: np.zeros((64, 32), np.float32)})),
         conversion.ShapeMismatchError, r"q_proj.weight.*\(64, 64\).*\(64, 32\)"),
        (dict(config=lambda c: c.update(model_type="bert")), conversion.WrongFamilyError,
         "'bert'.*qwen2, llama, gpt_neox"),
        (dict(config=lambda c: c.update(rope_parameters={"rope_type": "yarn", "factor": 2.0,
                                                         "rope_theta": 1e6})),
         conversion.UnsupportedConfigError, "yarn"),
        (dict(config=lambda c: c.update(use_sliding_window=True)),
         conversion.UnsupportedConfigError, "use_sliding_window"),
        (dict(config=lambda c: c.update(hidden_act="relu2")), conversion.UnsupportedConfigError,
         "relu2"),
    ]
    for k, (edit, err, match) in enumerate(cases):
        with pytest.raises(err, match=match):
            conversion.from_hf(_edit(d, tmp_path / f"case{k}", **edit))
    # A tied checkpoint that carries an lm_head different from the embedding.
    tied = _edit(hf["qwen2_tied"][1], tmp_path / "tied", tensors=lambda t: t.update(
        {"lm_head.weight": t["model.embed_tokens.weight"] + 1}))
    with pytest.raises(conversion.TiedEmbeddingError, match="lm_head.weight"):
        conversion.from_hf(tied)
    # An unreadable weights file is named.
    bad = _edit(d, tmp_path / "garbage")
    with open(os.path.join(bad, "model.safetensors"), "wb") as f:
        f.write(b"not a safetensors file")
    with pytest.raises(conversion.UnreadableFileError, match="model.safetensors"):
        conversion.from_hf(bad)
    with pytest.raises(FileNotFoundError, match="no weights"):
        os.remove(os.path.join(bad, "model.safetensors"))
        conversion.from_hf(bad)


def test_import_onto_a_mesh(hf, imported):
    from jaxdyn import sharding

    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    cfg, params = conversion.from_hf(hf["qwen2_tied"][1], mesh=mesh)
    ref = flat(imported["qwen2_tied"][1])
    for k, v in flat(params).items():
        assert v.sharding.mesh.shape == mesh.shape and np.array_equal(v, ref[k]), k
    q = params["layers"]["attn"]["q"]["kernel"]  # [L, D, N, Hd]: split over devices
    assert q.addressable_shards[0].data.size < q.size


def _add_tokenizer(folder: str) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 256)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<s>", "</s>"])
    tok.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>"}, f)


def test_load_for_inference_converts_an_hf_folder(hf, imported, tmp_path):
    src = str(tmp_path / "hf")
    shutil.copytree(hf["llama3"][1], src)
    _add_tokenizer(src)
    cfg, params, tok = load_for_inference(src)
    ref_cfg, ref = imported["llama3"]
    assert cfg == ref_cfg and tok.encode("w5 w7") == [5, 7] and tok.eos_id == 2
    assert all(np.array_equal(v, flat(ref)[k]) for k, v in flat(params).items())
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_for_inference(str(tmp_path / "missing"))


def test_cli_import_generate_export(hf, imported, tmp_path):
    from jaxdyn.checkpoint import load_model

    model, d = hf["qwen2_tied"]
    src = str(tmp_path / "hf")
    shutil.copytree(d, src)
    _add_tokenizer(src)
    cfg0, params0 = imported["qwen2_tied"]
    assert cli(["import", src, str(tmp_path / "imp")]) == 0
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json",
              "model_config.json"):
        assert os.path.exists(tmp_path / "imp" / f), f
    cfg, params, tok_dir = load_model(str(tmp_path / "imp"))
    assert cfg == cfg0 and tok_dir == str(tmp_path / "imp")
    ref = flat(imported["qwen2_tied"][1])
    assert all(np.array_equal(v, ref[k]) for k, v in flat(params).items())
    prompts = [list(range(3, 12)), [5, 7, 9, 11, 13]]  # the greedy test's shapes: no recompile
    assert generate(cfg, params, prompts, NEW).tokens == \
        generate(cfg0, params0, prompts, NEW).tokens
    assert cli(["export", str(tmp_path / "imp"), str(tmp_path / "exp")]) == 0
    card = open(tmp_path / "exp" / "README.md").read()
    assert "## Architecture" in card and "Qwen2ForCausalLM" in card
    assert os.path.exists(tmp_path / "exp" / "tokenizer.json")
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "exp"),
                                                    attn_implementation="eager")
    ids, pos = ids_and_positions()
    assert np.abs(hf_logits(reloaded, ids, pos) - hf_logits(model, ids, pos)).max() <= 1e-5
    assert cli(["import", str(tmp_path / "nothing"), str(tmp_path / "x")]) == 2


def _filled(abstract, dense_flat, source):
    """Concrete params on the real tree of a routed / multi-token model: tensors from the dense
    import where `source(path)` names one, zeros for new parameters (routers, heads)."""
    import flax.linen as nn

    out = {}
    for k, v in flat(nn.unbox(abstract)).items():
        src = source(k)
        out[k] = dense_flat[src[0]][src[1]] if src else jnp.zeros(v.shape, v.dtype)
        assert out[k].shape == v.shape, k
    return traverse_util.unflatten_dict(out, sep="/")


def test_routed_and_multitoken_export_their_dense_part(hf, imported, tmp_path):
    """A MoD model (unit j = dense layers 2j, 2j+1) and a multi-token model export back to the
    original HF bytes; routers, predictors and extra heads are reported as dropped."""
    from jaxdyn.model import abstract_params
    from jaxdyn.multitoken.heads import multitoken_model

    cfg, params = imported["qwen2_tied"]  # scanned: layers/… [L, …]
    dense = flat(params)
    orig = hf_tensors(hf["qwen2_tied"][1])
    mod_cfg = cfg.replace(arch="mod", routing={"capacity": 0.5})

    def mod_source(k):
        slot, _, rest = k.removeprefix("layers/").partition("/")
        if not k.startswith("layers/"):
            return k, ()
        return {"dense": (f"layers/{rest}", slice(0, None, 2)),
                "routed": (f"layers/{rest}", slice(1, None, 2))}.get(slot)

    mod_params = _filled(abstract_params(mod_cfg), dense, mod_source)
    mtp_abstract = jax.eval_shape(lambda r: multitoken_model(cfg, 2).init(
        r, jnp.zeros((1, 8), jnp.int32))["params"], jax.random.key(0))
    mtp_params = _filled(mtp_abstract, dense, lambda k: (k, ()) if k in dense else None)
    for tag, c, p, dropped in (("mod", mod_cfg, mod_params, "layers/router/"),
                               ("mtp", cfg, mtp_params, "heads/")):
        rep = conversion.to_hf(c, p, str(tmp_path / tag))
        back = hf_tensors(str(tmp_path / tag))
        assert set(back) == set(orig) and all(back[k].tobytes() == orig[k].tobytes()
                                               for k in orig), tag
        assert any(x.startswith(dropped) for x in rep.dropped), rep.dropped
        assert all(x.startswith(dropped.split("/")[0]) for x in rep.dropped), rep.dropped
        assert any("routing is not kept" in n for n in rep.notes) == (tag == "mod")


def test_model_card_reads_training_config_and_eval_results(imported, tmp_path):
    cfg = imported["llama3"][0].replace(arch="mod", routing={"capacity": 0.125})
    (tmp_path / "config.json").write_text(json.dumps({"train": {"steps": 100, "lr": 3e-4}}))
    (tmp_path / "eval.json").write_text(json.dumps(
        {"results": {"arc_easy": {"acc": 0.25, "alias": "arc_easy"}}}))
    card = model_card.render(cfg, name="m", train_config=model_card.read_train_config(
        str(tmp_path)), eval_results=model_card.find_eval_results(str(tmp_path)))
    assert '"steps": 100' in card and "| arc_easy / acc | 0.25 |" in card
    assert "| capacity | 0.125 |" in card and "llama3 (factor 8.0" in card


def test_memcheck_random_checkpoint_imports(tmp_path):
    """The benchmark's random checkpoint generator writes a folder that imports cleanly."""
    from conversion.memcheck import write_random_checkpoint

    n = write_random_checkpoint(str(tmp_path), hidden=64, layers=2, heads=4, kv_heads=2,
                                ffn=128, vocab=256, dtype="bfloat16")
    cfg, params, rep = conversion.from_hf(str(tmp_path), return_report=True)
    assert rep.bytes == n and rep.source_dtypes == ["bfloat16"] and cfg.num_kv_heads == 2
    assert params["layers"]["mlp"]["down"]["kernel"].shape == (2, 128, 64)
