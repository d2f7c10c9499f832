"""Generation: cached decode equals full forward, compiles once, padding and sampling rules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdyn.decode.generate import compiled_steps, generate
from jaxdyn.decode.sampling import SamplingConfig, filter_logits, sample
from jaxdyn.model import build, init_params, tiny


@pytest.fixture(scope="module")
def model():
    cfg = tiny("qwen2")
    return cfg, init_params(cfg, jax.random.key(0))


def greedy_reference(cfg, params, prompt, n):
    """Greedy continuation by full forward passes, no cache: one jitted forward over the
    sequence right-padded to its final length (causal: the padding never reaches the logits
    of the last real token), so it compiles once."""
    seq = list(prompt)
    L = len(prompt) + n
    fwd = jax.jit(lambda p, t: build(cfg).apply({"params": p}, t).logits)
    for _ in range(n):
        logits = fwd(params, jnp.asarray([seq + [0] * (L - len(seq))]))
        seq.append(int(jnp.argmax(logits[0, len(seq) - 1])))
    return seq[len(prompt):]


def test_greedy_cached_equals_uncached(model):
    cfg, params = model
    prompt = [3, 17, 42, 5, 9]
    res = generate(cfg, params, [prompt], max_new_tokens=12)
    assert res.tokens[0] == greedy_reference(cfg, params, prompt, 12)


def test_left_padded_batch_equals_single_prompts(model):
    cfg, params = model
    prompts = [[1, 2, 3], [7, 8, 9, 10, 11, 12, 13], [200]]
    batched = generate(cfg, params, prompts, max_new_tokens=8).tokens
    for p, b in zip(prompts, batched, strict=True):
        assert generate(cfg, params, [p], max_new_tokens=8).tokens[0] == b


def test_decode_step_compiles_once(model):
    cfg, params = model
    sampling = SamplingConfig(temperature=0.7, top_k=20, top_p=0.9)  # unique to this test
    _, step = compiled_steps(cfg, sampling)
    assert step._cache_size() == 0
    res = generate(cfg, params, [[1, 2, 3]], max_new_tokens=20, sampling=sampling)
    assert res.decode_steps == 19 and step._cache_size() == 1
    generate(cfg, params, [[4, 5, 6, 7]], max_new_tokens=20, sampling=sampling, seed=1)
    assert step._cache_size() == 1


def test_eos_stops_row(model):
    cfg, params = model
    first = generate(cfg, params, [[1, 2, 3]], max_new_tokens=6).tokens[0]
    eos = first[2]
    stopped = generate(cfg, params, [[1, 2, 3]], max_new_tokens=6, eos_id=eos).tokens[0]
    assert stopped == first[:first.index(eos) + 1]


def test_bad_prompts_are_clear_errors(model):
    cfg, params = model
    with pytest.raises(ValueError, match="empty"):
        generate(cfg, params, [[]], max_new_tokens=2)
    with pytest.raises(ValueError, match="context"):
        generate(cfg, params, [[1] * 2040], max_new_tokens=20)


def test_top_k_and_top_p_filtering():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    kept_k = filter_logits(logits, SamplingConfig(temperature=1.0, top_k=2)) > -1e30
    assert kept_k.tolist() == [[True, True, False, False]]
    kept_p = filter_logits(logits, SamplingConfig(temperature=1.0, top_p=0.8)) > -1e30
    assert kept_p.tolist() == [[True, True, False, False]]
    kept_p = filter_logits(logits, SamplingConfig(temperature=1.0, top_p=0.81)) > -1e30
    assert kept_p.tolist() == [[True, True, True, False]]
    draws = jax.vmap(lambda r: sample(logits[0:1].repeat(1, 0), r,
                                      SamplingConfig(temperature=1.0, top_k=2)))(
        jax.random.split(jax.random.key(0), 256))
    assert set(np.unique(draws).tolist()) == {0, 1}


def test_repetition_penalty_changes_greedy_choice():
    logits = jnp.array([[2.0, 1.9, -1.0]])
    seen = jnp.array([[True, False, False]])
    s = SamplingConfig(repetition_penalty=1.2)
    assert int(sample(logits, jax.random.key(0), s, seen)[0]) == 1
    assert int(sample(logits, jax.random.key(0), SamplingConfig(), seen)[0]) == 0


# ----------------------------------------------------------------------------- CLI


def save_checkpoint(path, cfg, params):
    """An import-style folder (model_config.json + params/ + byte tokenizer)."""
    from jaxdyn.checkpoint import save_params
    from jaxdyn.data.tokenizer import byte_tokenizer

    path.mkdir(parents=True, exist_ok=True)
    cfg.save(str(path / "model_config.json"))
    save_params(str(path / "params"), params)
    byte_tokenizer().save(str(path))
    return str(path)


def run_cli(capsys, *argv):
    from jaxdyn.cli.generate import main

    main(list(argv))
    out = capsys.readouterr()
    return out.out, out.err


def routed_cfg(arch):
    small = dict(hidden_size=32, num_heads=2, num_kv_heads=1, head_dim=16, intermediate_size=64,
                 vocab_size=258, num_layers=4 if arch == "mod" else 2)
    return tiny("qwen2", arch=arch, **small)


@pytest.mark.parametrize("arch", ["dense", "mod", "dtf"])
def test_cli_plain_equals_library_for_dense_mod_dtf(tmp_path, capsys, arch):
    cfg = tiny("qwen2", vocab_size=258) if arch == "dense" else routed_cfg(arch)
    params = jax.jit(lambda r: init_params(cfg, r))(jax.random.key(1))
    ckpt = save_checkpoint(tmp_path / arch, cfg, params)
    out, err = run_cli(capsys, "--checkpoint", ckpt, "--prompt", "def f(",
                       "--max_new_tokens", "6")
    ref = generate(cfg, params, [list(b"def f(")], 6, eos_id=256).tokens[0]
    ref = [t for t in ref if t != 256]
    assert out == f"=== 'def f('\n{bytes(ref).decode('utf-8', errors='replace')}\n"
    assert "tokens/s" in err and "[plain:" in err


def test_cli_hf_folder_imported_on_the_fly(tmp_path, capsys):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from jaxdyn.data.tokenizer import byte_tokenizer

    torch.manual_seed(0)
    hf = Qwen2ForCausalLM(Qwen2Config(vocab_size=258, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=2,
                                      num_key_value_heads=1, max_position_embeddings=128,
                                      tie_word_embeddings=False))
    hf.save_pretrained(tmp_path / "hf")
    byte_tokenizer().save(str(tmp_path / "hf"))
    out, _ = run_cli(capsys, "--checkpoint", str(tmp_path / "hf"), "--prompt", "ab",
                     "--max_new_tokens", "5")
    with torch.no_grad():  # greedy reference in PyTorch
        seq = torch.tensor([list(b"ab")])
        for _ in range(5):
            seq = torch.cat([seq, hf(seq).logits[:, -1:].argmax(-1)], 1)
    ref = [t for t in seq[0, 2:].tolist() if t != 256]
    assert out == f"=== 'ab'\n{bytes([t for t in ref if t < 256]).decode('utf-8', 'replace')}\n"


def test_cli_mtp_verify_equals_plain_and_multitoken_reports(tmp_path, capsys):
    from jaxdyn.cli.multitoken import main as multitoken_cli
    from jaxdyn.multitoken.heads import init_mtp_params

    cfg = tiny("gpt_neox", vocab_size=258, num_layers=2)
    ckpt = save_checkpoint(tmp_path / "mtp", cfg, init_mtp_params(cfg, 3, jax.random.key(2)))
    args = ["--checkpoint", ckpt, "--prompt", "import os", "--max_new_tokens", "12"]
    plain, _ = run_cli(capsys, *args)
    verify, err = run_cli(capsys, *args, "--mode", "verify")
    assert verify == plain and "acceptance" in err and "tokens/forward" in err
    (tmp_path / "corpus.txt").write_text("import os\nimport sys\n" * 20)
    multitoken_cli(["cooccur", "--data", str(tmp_path / "corpus.txt"), "--tokenizer", ckpt,
                  "--vocab_size", "258", "--out", str(tmp_path / "mtp" / "cooccur")])
    capsys.readouterr()
    _, err = run_cli(capsys, *args, "--mode", "multitoken", "--threshold", "1.0")
    assert "1.00 tokens/forward" in err and "ε_b=1.0" in err
    # The selection on device (default) and on the host emit the same text for a fixed seed.
    outs = [run_cli(capsys, *args, "--mode", "multitoken", "--threshold", "0.5",
                    "--dynamo_on", where, "--temperature", "0.7", "--seed", "3")
            for where in ("device", "host")]
    assert outs[0][0] == outs[1][0]
    stats = [err.split("ε_b=")[1] for _, err in outs]  # tokens/forward, emissions, back-offs
    assert stats[0] == stats[1]


def test_cli_bad_input_is_a_clear_error(tmp_path, capsys):
    cfg = tiny("qwen2", vocab_size=258, max_position_embeddings=64)
    ckpt = save_checkpoint(tmp_path / "d", cfg, init_params(cfg, jax.random.key(0)))
    from jaxdyn.cli.generate import main

    cases = [
        (["--checkpoint", str(tmp_path / "nope"), "--prompt", "x"], "does not exist"),
        (["--checkpoint", str(tmp_path), "--prompt", "x"], "model_config.json"),
        (["--checkpoint", ckpt, "--prompt", ""], "encodes to no tokens"),
        (["--checkpoint", ckpt, "--prompt", "x" * 80], "exceeds the model's context of 64"),
        (["--checkpoint", ckpt, "--prompt", "x", "--mode", "verify"], "multi-token checkpoint"),
        (["--checkpoint", ckpt], "exactly one of --prompt"),
    ]
    for argv, msg in cases:
        with pytest.raises(SystemExit, match=msg):
            main(argv)


# ----------------------------------------------------------------------------- bad flags


@pytest.mark.parametrize("field,value", [("temperature", float("nan")),
                                         ("temperature", float("inf")), ("temperature", -0.5),
                                         ("top_p", 0.0), ("top_p", 1.5), ("top_p", float("nan")),
                                         ("top_k", -1), ("repetition_penalty", float("nan"))])
def test_sampling_config_refuses_non_finite_and_out_of_range(field, value):
    with pytest.raises(ValueError, match=f"invalid sampling setting {field}="):
        SamplingConfig(**{field: value})


def test_cli_temperature_nan_is_one_line_exit_2():
    """`--temperature nan` used to print NUL bytes: one `error:` line naming the flag, exit 2,
    before any checkpoint is read."""
    import os
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "jaxdyn.generate", "--checkpoint", "/nowhere",
                          "--prompt", "x", "--temperature", "nan"], capture_output=True,
                         text=True, env={**os.environ, "JAXDYN_TRACEBACK": ""}, timeout=120)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines() == [
        "error: --temperature nan: must be a finite number >= 0 (0 = greedy)"]
    assert out.stdout == "" and "Traceback" not in out.stderr


@pytest.mark.parametrize("argv,says", [
    (["--temperature", "inf"], "--temperature inf: must be a finite number"),
    (["--temperature", "-1"], "--temperature -1.0: must be a finite number >= 0"),
    (["--top_p", "0"], "--top_p 0.0: must be a number in (0, 1]"),
    (["--top_p", "nan"], "--top_p nan:"),
    (["--top_k", "-2"], "--top_k -2: must be an integer >= 0"),
    (["--repetition_penalty", "0"], "--repetition_penalty 0.0:"),
    (["--max_new_tokens", "0"], "--max_new_tokens 0: must be >= 1"),
    (["--mode", "multitoken", "--threshold", "nan"], "--threshold nan: must lie in [0, 1]"),
    (["--mode", "multitoken", "--n_max", "0"], "--n_max 0: must be >= 1"),
])
def test_cli_bad_sampling_flags_name_the_flag(capsys, argv, says):
    from jaxdyn.cli.generate import main

    with pytest.raises(SystemExit) as e:
        main(["--checkpoint", "/nowhere", "--prompt", "x", *argv])
    assert e.value.code == 2 and str(e.value).startswith(says), str(e.value)
    err = capsys.readouterr().err
    assert err == f"error: {e.value}\n"


def test_cli_prompts_file_errors_and_traceback_switch(tmp_path, capsys, monkeypatch):
    from jaxdyn.cli.generate import main

    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "a"}\n{"text": "b"}\n')
    for path, says in [(bad, f"--prompts {bad}:2: each line needs a \"prompt\""),
                       (tmp_path / "none.jsonl", "is not a file")]:
        with pytest.raises(SystemExit) as e:
            main(["--checkpoint", "/nowhere", "--prompts", str(path)])
        assert e.value.code == 2 and says in str(e.value)
        assert capsys.readouterr().err.count("\n") == 1
    monkeypatch.setenv("JAXDYN_TRACEBACK", "1")  # user errors keep their traceback
    with pytest.raises(FileNotFoundError, match="is not a file"):
        main(["--checkpoint", "/nowhere", "--prompts", str(tmp_path / "none.jsonl")])


def test_compact_cache_overflow_is_reported_not_silent():
    """A MoD model whose causal routers select every token, with routed caches of 1/4 of the
    slots: tokens beyond that are skipped, and `generate` says how many, per prompt."""
    cfg = tiny("qwen2", arch="mod", routing={"capacity": 0.125, "cache_fraction": 0.25})
    params = init_params(cfg, jax.random.key(0))
    params = jax.tree_util.tree_map_with_path(  # c = 0 for every token: d = 1 everywhere
        lambda path, w: jnp.zeros_like(w) if any(getattr(k, "key", "") == "fc1" for k in path)
        and any(getattr(k, "key", "") == "predictor" for k in path) else w, params)
    prompts = [[1, 2, 3, 4, 5, 6, 7, 8], [9, 10, 11, 12]]
    with pytest.warns(UserWarning, match="cache overflow"):
        res = generate(cfg, params, prompts, max_new_tokens=24, bucket=8)
    # One routed layer (tiny: 2 layers); cache S = 8 + 24 = 32 slots -> 8 compact slots; every
    # real token is selected, so (prompt + generated tokens written) - 8 are dropped.
    written = [len(p) + 23 for p in prompts]  # the last new token is never fed back
    assert res.cache_overflow == [n - 8 for n in written]
    full = generate(cfg.replace(routing={"capacity": 0.125, "cache_fraction": 1.0}), params,
                    prompts, max_new_tokens=4)
    assert full.cache_overflow == [0, 0]
