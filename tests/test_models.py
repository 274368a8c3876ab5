import json

import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from conftest import make_toy_tl
from workbench.errors import WorkbenchError
from workbench.models import ModelSpec, from_hooked_transformer, load_model, save_tl_dir


def top_token(model, text):
    ids = torch.tensor([model.to_tokens(text)])
    with torch.no_grad():
        return model.decode([model.tl(ids)[0, -1].argmax()])


def test_embedded_model_answers_ioi_and_a_fact(smollm2):
    assert top_token(smollm2, "When Mary and John went to the store, John gave a drink to") == " Mary"
    assert top_token(smollm2, "The capital of France is") == " Paris"


def test_embedded_model_shape_and_grouped_query_attention(smollm2):
    assert (smollm2.n_layers, smollm2.n_heads, smollm2.n_kv_heads, smollm2.d_head) == (30, 9, 3, 64)
    assert smollm2.tl.cfg.n_key_value_heads == 3
    assert smollm2.tl.blocks[0].attn._W_K.shape[0] == 3


def test_embedded_model_matches_huggingface_logprobs(smollm2):
    """The processed TransformerLens model must give the GGUF model's own log-probs."""
    from transformers import AutoModelForCausalLM

    from workbench.models.gguf import SMOLLM2_GGUF, smollm2_gguf

    gguf = smollm2_gguf()
    hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    text = "Alice opened the door and saw that the garden was full of"
    ids = torch.tensor([smollm2.to_tokens(text)])
    with torch.no_grad():
        ours = smollm2.tl(ids).log_softmax(-1).cpu()
        theirs = hf(ids).logits.log_softmax(-1)
    assert (ours - theirs).abs().max().item() < 1e-3


def test_embedded_model_bos_choice_is_explicit_and_keyed(smollm2):
    ids = smollm2.to_tokens("The capital of France is")
    assert ids == smollm2.tokenizer("The capital of France is", add_special_tokens=False)["input_ids"]
    assert smollm2.identity.prepend_bos is False
    with_bos = load_model(ModelSpec("smollm2-135m", prepend_bos=True))
    assert with_bos.to_tokens("The capital")[0] == smollm2.tokenizer.bos_token_id
    assert with_bos.identity.key() != smollm2.identity.key()
    assert with_bos.identity.weights_hash == smollm2.identity.weights_hash


def test_embedded_model_cache_is_lazy_and_identity_stable(smollm2):
    again = load_model("smollm2-135m")
    assert not again.loaded  # identity, tokenizer and shapes come without reading the weights
    assert again.identity == smollm2.identity
    assert again.n_layers == 30 and again.d_vocab == 49152
    from workbench.models import weights_hash

    assert weights_hash(again.tl) == smollm2.identity.weights_hash


def test_toy_dir_roundtrip_gives_identical_logits(tmp_path):
    tl = make_toy_tl(seed=3)
    path = save_tl_dir(tl, tmp_path / "toy")
    model = load_model(str(path))
    tokens = torch.randint(0, 50, (2, 10))
    with torch.no_grad():
        assert torch.allclose(model.tl(tokens), tl(tokens), atol=1e-6)
    assert model.identity.source == "tl-dir"
    assert (model.n_layers, model.n_heads, model.d_head) == (2, 4, 8)


@pytest.mark.parametrize("extra", [dict(attn_only=False, normalization_type="RMS", gated_mlp=True,
                                        n_key_value_heads=2, positional_embedding_type="rotary", rotary_dim=8),
                                   dict(attn_only=False, normalization_type="LN")])
def test_linear_layout_keeps_logits_bit_identical_and_weights_hash(extra):
    """The relaid weights are views with other strides: outputs and the identity must not move."""
    from workbench.models import linear_layout, weights_hash

    tl = make_toy_tl(seed=5, **extra)
    tokens = torch.randint(0, 50, (2, 12))
    with torch.no_grad():
        before = tl(tokens)
    hash_before = weights_hash(tl)
    linear_layout(tl)
    assert not tl.unembed.W_U.is_contiguous() and tl.unembed.W_U.T.is_contiguous()
    assert not tl.blocks[0].attn.W_O.is_contiguous()
    with torch.no_grad():
        after = tl(tokens)
    if after.is_cuda:  # cuBLAS picks other kernels for other strides: equal to float32 rounding, not bit for bit
        assert torch.allclose(after, before, atol=1e-5, rtol=0)
    else:
        assert torch.equal(after, before)
    assert weights_hash(tl) == hash_before


def test_plain_toy_dir_without_workbench_metadata_loads(tmp_path):
    """config.json (HookedTransformerConfig fields) + model.safetensors (its state dict), nothing else."""
    tl = make_toy_tl(seed=4)
    d = tmp_path / "shared_toy"
    d.mkdir()
    cfg = {"n_layers": 2, "n_heads": 4, "d_head": 8, "d_model": 32, "d_vocab": 50, "n_ctx": 64,
           "attn_only": True, "act_fn": None, "normalization_type": "LN"}
    (d / "config.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in tl.state_dict().items()}, str(d / "model.safetensors"))
    model = load_model(str(d))
    tokens = torch.randint(0, 50, (1, 12))
    with torch.no_grad():
        assert torch.allclose(model.tl(tokens), tl(tokens), atol=1e-6)


def test_weights_hash_changes_with_any_weight():
    tl = make_toy_tl(seed=5)
    a = from_hooked_transformer(tl, "t").identity.weights_hash
    assert from_hooked_transformer(tl, "t").identity.weights_hash == a
    with torch.no_grad():
        tl.blocks[1].attn.W_O[2, 3, 4] += 1e-3
    assert from_hooked_transformer(tl, "t").identity.weights_hash != a


@pytest.mark.parametrize(
    "name, message",
    [
        ("no-such-model-xyz", "unknown model 'no-such-model-xyz'"),
        ("./does/not/exist", "is not a directory"),
    ],
)
def test_bad_model_names_give_clear_errors(name, message):
    with pytest.raises(WorkbenchError, match=message):
        load_model(name)


def test_directory_without_config_is_refused(tmp_path):
    with pytest.raises(WorkbenchError, match="neither a TransformerLens model directory"):
        load_model(str(tmp_path))


def test_toy_dir_with_mismatched_weights_is_refused(tmp_path):
    path = save_tl_dir(make_toy_tl(), tmp_path / "toy")
    cfg = json.loads((path / "config.json").read_text())
    cfg["n_layers"] = 3
    (path / "config.json").write_text(json.dumps(cfg))
    (path / "workbench.json").unlink()
    with pytest.raises(WorkbenchError, match="does not match its config.json"):
        load_model(str(path))


def test_local_huggingface_directory_loads_with_grouped_query_attention(tmp_path):
    """A tiny Llama (4 query heads sharing 2 key/value heads) saved as a Hugging Face directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)
    hf = LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path / "tiny-llama")
    model = load_model(str(tmp_path / "tiny-llama"))
    assert (model.n_layers, model.n_heads, model.n_kv_heads) == (2, 4, 2)
    assert model.identity.source == "hf-dir"
    tokens = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        diff = model.tl(tokens).log_softmax(-1).cpu() - hf(tokens).logits.log_softmax(-1)
    assert diff.abs().max().item() < 1e-4


def test_tf32_is_keyed_refused_where_it_cannot_apply_and_set_only_while_a_run_computes(tmp_path, toy_dir):
    import dataclasses

    from workbench.methods import _METHODS, Outputs, Metric, register
    from workbench.result import Result
    from workbench.runner import run_method
    from workbench.store import Store
    from workbench.tasks import build_task

    assert ModelSpec.parse({"name": "x", "tf32": True}).tf32
    with pytest.raises(WorkbenchError, match="only with dtype = \"float32\""):
        ModelSpec.parse({"name": "x", "dtype": "bfloat16", "tf32": True})
    if not torch.cuda.is_available():
        with pytest.raises(WorkbenchError, match="tf32 = true needs a CUDA device"):
            load_model({"name": str(toy_dir), "tf32": True})
    plain = load_model(str(toy_dir))
    fast = from_hooked_transformer(plain.tl, "toy")
    fast.identity = dataclasses.replace(plain.identity, tf32=True)
    assert fast.identity.key() != plain.identity.key() and "tf32" not in plain.identity.key()

    @dataclasses.dataclass(frozen=True)
    class Params:
        pass

    seen = []

    @register("test.tf32_probe", Params, "records the matmul precision it ran under",
              Outputs((Metric("tf32_on", "1 when TF32 matrix products were allowed", "model", (), "summary"),)))
    def probe(model, task, params, ctx):
        seen.append(torch.backends.cuda.matmul.allow_tf32)
        return Result(pd.DataFrame([dict(component="model", metric="tf32_on", value=float(seen[-1]))]))

    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        task = build_task(plain, "induction", {"n_prompts": 2, "seq_len": 4})
        store = Store(tmp_path / "s")
        assert run_method(fast, task, "test.tf32_probe", {}, store).value("tf32_on") == 1.0
        assert run_method(plain, task, "test.tf32_probe", {}, store).value("tf32_on") == 0.0
        assert seen == [True, False] and torch.backends.cuda.matmul.allow_tf32 is False
    finally:
        _METHODS.pop("test.tf32_probe")


def test_a_random_model_in_a_real_shape_holds_the_same_weights_as_its_huggingface_twin(smollm2):
    """Benchmarks time ours against Hugging Face on these: both must compute the same function."""
    from workbench.models.shapes import SHAPES, random_model

    model, hf = random_model("gpt2-small", device="cpu", tokenizer=smollm2.tokenizer, keep_hf=True)
    shape = SHAPES["gpt2-small"]
    assert (model.n_layers, model.n_heads, model.d_model, model.d_vocab) == (shape["n_layer"], shape["n_head"],
                                                                               shape["n_embd"], shape["vocab_size"])
    ids = torch.tensor([model.to_tokens("When Mary and John went to the store, John gave a drink to")])
    with torch.no_grad():
        diff = model.tl(ids).log_softmax(-1) - hf(ids).logits.log_softmax(-1)
    assert diff.abs().max().item() < 1e-4
    assert model.identity.weights_hash == "random-gpt2-small-seed0-cpu"
