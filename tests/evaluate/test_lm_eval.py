"""lm-evaluation-harness adapter: its log-likelihoods equal the model's own (full forward,
no adapter code) on requests and on a local custom lm_eval task; rolling scores; generation."""

import functools
import json
import math

import jax
import numpy as np
import pytest

from jaxdyn.data.tokenizer import byte_tokenizer
from jaxdyn.decode.generate import generate
from jaxdyn.evaluate.lm_eval import JaxdynScorer
from jaxdyn.model import build, init_params, tiny

DOCS = [{"q": "1 + 1 =", "choices": ["2", "3", "11"], "gold": 0},
        {"q": "def f(x): return", "choices": ["x", "(", " import"], "gold": 0},
        {"q": "import", "choices": ["os", "sys"], "gold": 1}]


@pytest.fixture(scope="module")
def model():
    cfg = tiny("qwen2", vocab_size=258, max_position_embeddings=64)
    return cfg, jax.jit(lambda r: init_params(cfg, r))(jax.random.key(0))


@functools.cache
def _forward(cfg):
    return jax.jit(lambda p, x: jax.nn.log_softmax(build(cfg).apply({"params": p}, x).logits))


def own_loglik(cfg, params, ctx_ids, cont_ids):
    """Σ log p(cont | ctx) from one full forward pass of the model itself (right-padded to 64:
    causal attention keeps the padding out)."""
    seq = list(ctx_ids) + list(cont_ids)
    ids = np.zeros((1, 64), np.int32)
    ids[0, :len(seq)] = seq
    logp = np.asarray(_forward(cfg)(params, ids)[0], np.float64)
    n = len(ctx_ids)
    return float(sum(logp[n - 1 + j, t] for j, t in enumerate(cont_ids)))


def test_loglikelihood_rolling_and_generation_equal_the_model(model):
    cfg, params = model
    sc = JaxdynScorer(cfg=cfg, params=params, tokenizer=byte_tokenizer(), batch_size=2,
                      max_length=16, bucket=8)
    reqs = [("1 + 1 =", " 2"), ("abc ", "def"), ("", "hello"), ("x" * 30, " yz")]
    got = sc.loglikelihood(reqs)
    ctx_of = {0: list(b"1 + 1 ="), 1: list(b"abc"), 2: [256], 3: list(b"x" * 30)}
    cont_of = {0: list(b" 2"), 1: list(b" def"), 2: list(b"hello"), 3: list(b" yz")}
    for i in range(4):  # request 3 is left-truncated to max_length=16 input tokens
        ctx = (ctx_of[i] + cont_of[i])[-17:][:-len(cont_of[i])]
        assert got[i][0] == pytest.approx(own_loglik(cfg, params, ctx, cont_of[i]), rel=1e-5)
    text = "for i in range(10): print(i)"  # 28 tokens -> windows of 16 and 12
    ids = list(text.encode())
    ref = own_loglik(cfg, params, [256], ids[:16]) + own_loglik(cfg, params, ids[15:16],
                                                                 ids[16:])
    assert sc.loglikelihood_rolling([text])[0] == pytest.approx(ref, rel=1e-5)
    new = generate(cfg, params, [list(b"def ")], 8, eos_id=256).tokens[0]
    text = byte_tokenizer().decode([t for t in new if t != 256])
    stop = text[3] if len(text) > 3 else "\x00"
    out = sc.generate_until([("def ", {"until": [stop], "max_gen_toks": 8})])[0]
    assert out == text[:text.find(stop)]
    with pytest.raises(ValueError, match="empty continuation"):
        sc.loglikelihood([("abc", "")])


def test_lm_eval_local_task_loglikelihoods_equal_the_model(model, tmp_path):
    lm_eval = pytest.importorskip("lm_eval", reason="lm_eval is the optional `eval` extra")
    from lm_eval.api.instance import Instance
    from lm_eval.tasks import TaskManager

    from jaxdyn.evaluate.lm_eval import JaxdynLM

    cfg, params = model
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (tmp_path / "mc.yaml").write_text(f"""task: jaxdyn_local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{q}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: gold
metric_list:
  - metric: acc
""")
    lm = JaxdynLM(scorer=JaxdynScorer(cfg=cfg, params=params, tokenizer=byte_tokenizer(),
                                      batch_size=4))
    res = lm_eval.simple_evaluate(model=lm, tasks=["jaxdyn_local_mc"], log_samples=True,
                                  task_manager=TaskManager(include_path=str(tmp_path),
                                                           include_defaults=False))
    hits = []
    for s in res["samples"]["jaxdyn_local_mc"]:
        doc = s["doc"]
        own = [own_loglik(cfg, params, list(doc["q"].encode()), list((" " + c).encode()))
               for c in doc["choices"]]
        got = [float(r[0][0]) for r in s["resps"]]
        assert got == pytest.approx(own, rel=1e-5)
        hits.append(int(np.argmax(own)) == doc["gold"])
    assert res["results"]["jaxdyn_local_mc"]["acc,none"] == pytest.approx(np.mean(hits))
    inst = Instance("loglikelihood", {}, ("1 + 1 =", " 2"), 0)
    roll = Instance("loglikelihood_rolling", {}, ("abc",), 0)
    assert lm.loglikelihood([inst])[0][0] == pytest.approx(
        own_loglik(cfg, params, list(b"1 + 1 ="), list(b" 2")), rel=1e-5)
    assert math.isfinite(lm.loglikelihood_rolling([roll])[0])
