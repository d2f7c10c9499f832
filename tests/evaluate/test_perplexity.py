"""jaxdyn.evaluate.perplexity: perplexity equals exp of the directly computed mean token NLL
(dense, MTP heads and PPL_{1:n}), bits per byte, routed-unit statistics, CLI and clear errors."""

import json
import math

import jax
import numpy as np
import pytest

from jaxdyn.cli.evaluate import main
from jaxdyn.data.tokenizer import byte_tokenizer
from jaxdyn.evaluate.perplexity import evaluate, load_corpus
from jaxdyn.model import build, init_params, tiny
from jaxdyn.multitoken.heads import all_logits, dense_params_of, init_mtp_params, multitoken_model

TEXTS = ["def f(x):\n    return x + 1\n", "import os\nprint(os.sep)\n", "a = [1, 2, 3]\n",
         "class A:\n    pass\n", "for i in range(3):\n    print(i)\n"]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    return str(path)


def direct_logp(cfg, params, n_heads=1):
    """Per document, log-probabilities [n, T, V] of an unpacked forward pass (documents
    right-padded into one batch: causal attention keeps the padding out of every position)."""
    docs = [np.asarray(list(t.encode()) + [256], np.int32) for t in TEXTS]
    ids = np.zeros((len(docs), 64), np.int32)
    for i, d in enumerate(docs):
        ids[i, :len(d)] = d
    if n_heads == 1:
        fwd = jax.jit(lambda p, x: build(cfg).apply({"params": p}, x).logits[None])
    else:
        model = multitoken_model(cfg, n_heads)
        fwd = jax.jit(lambda p, x: all_logits(model.apply({"params": p}, x)))
    logp = np.asarray(jax.nn.log_softmax(fwd(params, ids), -1), np.float64)  # [n, B, T, V]
    return [(d, logp[:, i, :len(d)]) for i, d in enumerate(docs)]


def test_ppl_equals_exp_of_mean_token_nll_computed_directly(data_file):
    cfg = tiny("qwen2", vocab_size=258)
    params = init_params(cfg, jax.random.key(0))
    corpus = load_corpus(byte_tokenizer(), data_file, seq_len=64, batch_size=2)
    res = evaluate(cfg, params, corpus.batches, bytes_per_target=corpus.bytes_per_target)
    nll = [-lp[0, t, ids[t + 1]] for ids, lp in direct_logp(cfg, params)
           for t in range(len(ids) - 1)]
    assert res["tokens"] == len(nll) == sum(len(t.encode()) for t in TEXTS)
    assert res["ppl"] == pytest.approx(math.exp(np.mean(nll)), rel=1e-5)
    assert res["bits_per_byte"] == pytest.approx(np.mean(nll) / math.log(2), rel=1e-5)


def test_mtp_head_perplexities_and_joint(data_file):
    cfg = tiny("gpt_neox", vocab_size=258, num_layers=2)
    params = init_mtp_params(cfg, 3, jax.random.key(1))
    batches = load_corpus(byte_tokenizer(), data_file, seq_len=64, batch_size=2).batches
    res = evaluate(cfg, params, batches)
    docs = direct_logp(cfg, params, 3)
    for i in (1, 2, 3):
        nll = [-lp[i - 1, t, ids[t + i]] for ids, lp in docs for t in range(len(ids) - i)]
        assert res[f"mtp/ppl_{i}"] == pytest.approx(math.exp(np.mean(nll)), rel=1e-5)
    joint = [sum(-lp[i - 1, t, ids[t + i]] for i in (1, 2, 3)) / 3 for ids, lp in docs
             for t in range(len(ids) - 3)]
    assert res["mtp/ppl_1:3"] == pytest.approx(math.exp(np.mean(joint)), rel=1e-5)
    dense = evaluate(cfg, dense_params_of(params), batches)  # head 1 is the dense model
    assert dense["ppl"] == pytest.approx(res["ppl"], rel=1e-6) == res["mtp/ppl_1"]


def test_routed_model_reports_selected_fraction_per_unit(data_file):
    cfg = tiny("qwen2", arch="mod", vocab_size=258, num_layers=4)
    params = init_params(cfg, jax.random.key(2))
    batches = load_corpus(byte_tokenizer(), data_file, seq_len=64, batch_size=2).batches
    for mode in ("topk", "causal"):
        res = evaluate(cfg, params, batches, routing_mode=mode)
        fracs = [res[f"router/layer_{u}/selected_frac"] for u in range(2)]  # 2 superblocks
        assert "router/layer_2/selected_frac" not in res
        assert all(0.0 <= f <= 1.0 for f in fracs) and np.isfinite(res["ppl"])


def test_cli_json_and_clear_errors(tmp_path, data_file, capsys):
    from jaxdyn.checkpoint import save_params

    cfg = tiny("qwen2", vocab_size=258, max_position_embeddings=128)
    params = init_params(cfg, jax.random.key(0))
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    cfg.save(str(ckpt / "model_config.json"))
    save_params(str(ckpt / "params"), params)
    byte_tokenizer().save(str(ckpt))
    main(["--checkpoint", str(ckpt), "--data", data_file, "--seq_len", "64",
          "--out", str(tmp_path / "r.json")])
    printed = json.loads(capsys.readouterr().out)
    corpus = load_corpus(byte_tokenizer(), data_file, seq_len=64, batch_size=8)
    assert printed["ppl"] == pytest.approx(evaluate(cfg, params, corpus.batches)["ppl"],
                                           rel=1e-6)
    assert json.loads((tmp_path / "r.json").read_text()) == printed
    assert printed["documents"] == len(TEXTS) and printed["split"] == "all"
    for argv, msg in [
        (["--checkpoint", str(tmp_path / "missing")], "does not exist"),
        (["--checkpoint", str(ckpt), "--data", str(tmp_path / "none.txt"), "--seq_len", "64"],
         "--data"),
        (["--checkpoint", str(ckpt), "--data", data_file, "--seq_len", "512"], "context"),
    ]:
        with pytest.raises(SystemExit, match=msg):
            main(argv)
