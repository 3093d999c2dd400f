"""Every served family gives transformers' logits on the same weights, loaded through our loader."""

import contextlib
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.testing import assert_close
from transformers import AutoModelForCausalLM, GemmaConfig, GPTJConfig, MistralConfig, Qwen2Config
from transformers import GPT2Config as HFGPT2Config
from transformers import LlamaConfig as HFLlamaConfig

from flover_backend.execution.kv_arena import KVArena
from flover_backend.execution.layers.attention import ForwardBatch
from flover_backend.execution.layers.ops import UsesKernels, install_kernels
from flover_backend.execution.models import MODEL_REGISTRY, loader
from flover_backend.execution.models.gpt2 import GPT2Config
from flover_backend.execution.models.llama import Llama, LlamaConfig
from flover_backend.execution.models.loader import load_model, resolve_model_path
from flover_backend.native import attention as native_attention
from flover_backend.native import elementwise as native_elementwise
from flover_backend.native import small_gemm as native_small_gemm
from tests.native_kernels import built

VOCAB_SIZE = 96
PROMPT_LENS = [5, 9]
NUM_DECODE_STEPS = 4
MAX_LEN = 16
TOLERANCE = {"atol": 1e-4, "rtol": 1e-4}

HF_CONFIGS = {
    "llama-gqa": lambda: HFLlamaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rope_theta=500.0,
        rms_norm_eps=1e-5),
    "llama-tied-bias-headdim": lambda: HFLlamaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, head_dim=8, max_position_embeddings=64,
        attention_bias=True, mlp_bias=True, tie_word_embeddings=True),
    "gpt2": lambda: HFGPT2Config(vocab_size=VOCAB_SIZE, n_embd=64, n_layer=2, n_head=4, n_positions=64),
    # Partial rotary: 8 of each head's 16 features rotate.
    "gptj": lambda: GPTJConfig(vocab_size=VOCAB_SIZE, n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=64,
                               bos_token_id=1, eos_token_id=2),
    # Windows shorter than the longest prompt (9) and than its decode steps, so both paths hide keys.
    "mistral-sliding": lambda: MistralConfig(
        vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, sliding_window=6),
    # Qwen2's window covers layers from max_window_layers on: here layer 1 slides and layer 0 does not.
    "qwen2-tied-sliding": lambda: Qwen2Config(
        vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True, use_sliding_window=True,
        sliding_window=5, max_window_layers=1),
    "gemma": lambda: GemmaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=24, max_position_embeddings=64),
}


def hf_model(name: str) -> torch.nn.Module:
    """A random transformers model whose norms and biases are off their ones/zeros init."""
    torch.manual_seed(0)
    config = HF_CONFIGS[name]()
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:  # a norm or bias left at its init would hide a missing one
                param.add_(torch.randn_like(param) * 0.1)
    return model


def prefill_in_chunks(ours, seqs: list[list[int]], kv: KVArena, chunk: int) -> torch.Tensor:
    """Write prompts into rows 0.. `chunk` tokens per forward, as the scheduler hands them out; last states."""
    last: dict[int, torch.Tensor] = {}
    for start in range(0, max(map(len, seqs)), chunk):
        rows = [i for i, seq in enumerate(seqs) if len(seq) > start]
        pieces = [seqs[i][start:start + chunk] for i in rows]
        input_ids = torch.zeros(len(rows), max(map(len, pieces)), dtype=torch.long)
        for b, piece in enumerate(pieces):
            input_ids[b, :len(piece)] = torch.tensor(piece)
        batch = ForwardBatch.prefill(torch.tensor(rows), [len(p) for p in pieces], torch.device("cpu"),
                                     [start] * len(rows))
        hidden = ours.forward(input_ids, batch, kv)
        for b, i in enumerate(rows):
            if start + len(pieces[b]) == len(seqs[i]):
                last[i] = hidden[b, batch.last_index[b]]
    return torch.stack([last[i] for i in range(len(seqs))])


def attention_kernel() -> native_attention.DecodeAttentionKernel:
    """The compiled decode-attention kernel, as the engine builds it."""
    return built(native_attention)


def with_native_kernels(ours):
    """`ours` running its element-wise work and its few-row matmuls through the compiled kernels, over oneDNN-packed
    weights, as the engine has it on CPU fp32."""
    install_kernels(ours, built(native_elementwise))
    ours.prepack(4, built(native_small_gemm))
    return ours


def check_against_hf(ours, hf, chunk: int | None = None, kernel=None) -> None:
    """Prefill two right-padded prompts (whole, or `chunk` tokens at a time), decode a few steps (attending
    through the compiled `kernel` if one is given, over the position-major arena the engine gives it), and
    compare each step with HF's full forward."""
    c = ours.config
    generator = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, VOCAB_SIZE, (n,), generator=generator).tolist() for n in PROMPT_LENS]
    kv = KVArena.for_model(c, 3, MAX_LEN, position_major=kernel is not None)  # one spare row
    input_ids = torch.zeros(len(seqs), max(PROMPT_LENS), dtype=torch.long)
    for i, seq in enumerate(seqs):
        input_ids[i, :len(seq)] = torch.tensor(seq)
    batch = ForwardBatch.prefill(slice(0, 2), PROMPT_LENS, torch.device("cpu"))
    with torch.no_grad():
        if chunk is None:
            hidden = ours.forward(input_ids, batch, kv)
            logits = ours.compute_logits(hidden[torch.arange(2), batch.last_index])
        else:
            logits = ours.compute_logits(prefill_in_chunks(ours, seqs, kv, chunk))
        for step in range(NUM_DECODE_STEPS + 1):
            assert logits.dtype == torch.float32 and logits.shape == (2, VOCAB_SIZE)
            for i, seq in enumerate(seqs):
                expected = hf(torch.tensor([seq])).logits[0, -1]
                assert_close(logits[i], expected, **TOLERANCE, msg=f"step {step} row {i}")
            if step == NUM_DECODE_STEPS:
                break
            next_ids = logits.argmax(-1)
            context_lens = torch.tensor([len(seq) for seq in seqs])
            for seq, token_id in zip(seqs, next_ids.tolist(), strict=True):
                seq.append(token_id)
            batch = ForwardBatch.decode(slice(0, 2), context_lens, int(context_lens.max()) + 1, kernel=kernel)
            logits = ours.compute_logits(ours.forward(next_ids[:, None], batch, kv)[:, 0])


@pytest.mark.parametrize("native", [False, True], ids=["torch-ops", "native-kernels"])
@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
def test_logits_match_transformers(name, sharded, native, tmp_path):
    hf = hf_model(name)
    hf.save_pretrained(tmp_path, max_shard_size="40KB" if sharded else "1GB")
    files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert (len(files) > 2) == sharded, files
    ours = load_model(tmp_path, torch.float32, "cpu")
    assert isinstance(ours, MODEL_REGISTRY[hf.config.architectures[0]])
    check_against_hf(with_native_kernels(ours) if native else ours, hf, kernel=attention_kernel() if native else None)


@pytest.mark.parametrize("chunk", [2, 4])
@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
def test_prompts_written_in_chunks_give_the_same_logits(name, chunk, tmp_path):
    """Later chunks attend to the positions the row already holds, causally within the chunk."""
    hf = hf_model(name)
    hf.save_pretrained(tmp_path)
    check_against_hf(with_native_kernels(load_model(tmp_path, torch.float32, "cpu")), hf, chunk=chunk,
                     kernel=attention_kernel())


def expected_share(state: dict[str, torch.Tensor], rank: int, world: int) -> dict[str, torch.Tensor]:
    """Rank `rank`'s parameters for a Llama checkpoint `state`, written out by hand from the HF tensors."""
    def block(key: str, dim: int) -> torch.Tensor:
        return state[key].chunk(world, dim)[rank]  # heads and MLP columns are contiguous

    share = {}
    for key, tensor in state.items():
        *path, module, leaf = key.split(".")
        prefix = ".".join(path)
        if module == "q_proj":
            share[f"{prefix}.qkv_proj.{leaf}"] = torch.cat([block(f"{prefix}.{p}_proj.{leaf}", 0) for p in "qkv"])
        elif module == "gate_proj":
            share[f"{prefix}.gate_up_proj.{leaf}"] = torch.cat(
                [block(f"{prefix}.{p}_proj.{leaf}", 0) for p in ("gate", "up")])
        elif module in ("o_proj", "down_proj"):
            share[key] = block(key, 1) if leaf == "weight" else tensor  # a bias is whole, added by rank 0 only
        elif not module.endswith("_proj"):
            share[key] = tensor  # embeddings, norms and the LM head: whole on every rank
    return share


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("name", ["llama-gqa", "llama-tied-bias-headdim"])
def test_each_rank_stacks_its_blocks_of_the_separate_projections(name, world, tmp_path):
    """q/k/v and gate/up, separate in the checkpoint, fill each rank's stacked projections with its blocks."""
    hf_model(name).save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    for rank in range(world):
        params = dict(load_model(tmp_path, torch.float32, "cpu", rank, world).named_parameters())
        expected = expected_share(state, rank, world)
        assert params.keys() == expected.keys()
        for key, tensor in expected.items():
            assert torch.equal(params[key], tensor), (rank, key)


class CountingCheckpoint:
    """A safetensors checkpoint that adds up the elements read through it."""

    def __init__(self, checkpoint, num_read: list[int]):
        self.checkpoint, self.num_read = checkpoint, num_read

    def keys(self):
        return self.checkpoint.keys()

    def get_tensor(self, key: str) -> torch.Tensor:
        return self._counted(self.checkpoint.get_tensor(key))

    def get_slice(self, key: str):
        view, counted = self.checkpoint.get_slice(key), self._counted

        class CountingSlice:
            get_shape = view.get_shape

            def __getitem__(self, index):
                return counted(view[index])

        return CountingSlice()

    def _counted(self, tensor: torch.Tensor) -> torch.Tensor:
        self.num_read.append(tensor.numel())
        return tensor


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("name", ["llama-gqa", "gptj"])
def test_each_rank_reads_only_the_elements_it_holds(name, world, tmp_path, monkeypatch):
    """No rank reads the whole model: what a rank reads from the checkpoint is exactly what it holds."""
    hf_model(name).save_pretrained(tmp_path)
    num_read: list[int] = []

    @contextlib.contextmanager
    def counting_safe_open(*args, **kwargs):
        with safe_open(*args, **kwargs) as checkpoint:
            yield CountingCheckpoint(checkpoint, num_read)

    monkeypatch.setattr(loader, "safe_open", counting_safe_open)
    checkpoint_size = sum(t.numel() for t in load_file(tmp_path / "model.safetensors").values())
    for rank in range(world):
        num_read.clear()
        model = load_model(tmp_path, torch.float32, "cpu", rank, world)
        assert sum(num_read) == sum(p.numel() for p in model.parameters())
        assert (sum(num_read) == checkpoint_size) == (world == 1)


def test_gpt2_openai_key_layout(tmp_path):
    """OpenAI's gpt2 checkpoints drop the `transformer.` prefix and lm_head, and carry mask buffers."""
    hf = hf_model("gpt2")
    hf.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    n = hf.config.n_positions
    openai = {key.removeprefix("transformer."): t for key, t in state.items() if key != "lm_head.weight"}
    for i in range(hf.config.n_layer):
        openai[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n, n)).view(1, 1, n, n)
        openai[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    (tmp_path / "model.safetensors").unlink()
    save_file(openai, tmp_path / "model.safetensors")
    check_against_hf(load_model(tmp_path, torch.float32, "cpu"), hf)


@pytest.mark.parametrize("name", ["llama-gqa", "gemma"])
def test_bfloat16_load(name, tmp_path):
    hf = hf_model(name)
    hf.save_pretrained(tmp_path)
    ours = load_model(tmp_path, torch.bfloat16, "cpu")
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    assert ours.rope_cos.dtype == torch.bfloat16
    c = ours.config
    kv = KVArena.for_model(c, 1, MAX_LEN, torch.bfloat16)
    batch = ForwardBatch.prefill(slice(0, 1), [6], torch.device("cpu"))
    ids = torch.arange(6)[None]
    with torch.no_grad():
        logits = ours.compute_logits(ours.forward(ids, batch, kv)[0, -1:])
        expected = hf(ids).logits[0, -1:]
    assert logits.dtype == torch.float32
    assert_close(logits, expected, atol=0.05, rtol=0.05)


def _rewrite_weights(path, edit) -> None:
    """Apply `edit` to the single-file checkpoint's state dict in place."""
    state = load_file(path / "model.safetensors")
    edit(state)
    save_file(state, path / "model.safetensors")


def test_loader_rejects_missing_and_unexpected_keys(tmp_path):
    hf_model("llama-gqa").save_pretrained(tmp_path)
    _rewrite_weights(tmp_path, lambda s: s.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing keys \['model.layers.1.mlp.up_proj.weight'\]"):
        load_model(tmp_path, torch.float32, "cpu")
    _rewrite_weights(tmp_path, lambda s: s.update({"model.layers.1.mlp.up_proj.weight": torch.zeros(96, 64),
                                                   "model.layers.0.extra.weight": torch.zeros(2)}))
    with pytest.raises(ValueError, match=r"unexpected keys \['model.layers.0.extra.weight'\]"):
        load_model(tmp_path, torch.float32, "cpu")

    def shrink_k_proj(state):
        del state["model.layers.0.extra.weight"]
        state["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(16, 64)  # one KV head of two

    _rewrite_weights(tmp_path, shrink_k_proj)
    with pytest.raises(ValueError, match=r"k_proj.weight: the checkpoint's shape \(16, 64\) is not the \(32, 64\)"):
        load_model(tmp_path, torch.float32, "cpu")


def test_loader_rejects_unknown_architecture(tmp_path):
    hf_model("llama-gqa").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "architectures": ["MambaForCausalLM"]}))
    with pytest.raises(NotImplementedError, match="MambaForCausalLM") as error:
        load_model(tmp_path, torch.float32, "cpu")
    for supported in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "GemmaForCausalLM",
                      "GPT2LMHeadModel", "GPTJForCausalLM"):
        assert supported in str(error.value)


def test_gpt2_refuses_tensor_parallelism(tmp_path):
    hf_model("gpt2").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="GPT-2 cannot be split for tensor parallelism"):
        load_model(tmp_path, torch.float32, "cpu", rank=0, world=2)


@pytest.mark.parametrize("rope", [
    {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
    {"rope_scaling": {"type": "linear", "factor": 2.0}},
    {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}},
])
def test_llama_config_refuses_rope_scaling(rope):
    base = {"vocab_size": 10, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
            "num_attention_heads": 2}
    with pytest.raises(NotImplementedError, match="rope scaling"):
        LlamaConfig.from_hf({**base, **rope})
    config = LlamaConfig.from_hf({**base, "rope_theta": 5e5, "rope_scaling": None})
    assert (config.rope_theta, config.num_kv_heads, config.head_dim) == (5e5, 2, 4)


def test_model_configs_expose_engine_fields():
    llama = LlamaConfig.from_hf({**HF_CONFIGS["llama-gqa"]().to_dict(), "eos_token_id": [2, 7]})
    assert (llama.num_layers, llama.num_kv_heads, llama.head_dim, llama.eos_token_id) == (2, 2, 16, [2, 7])
    assert llama.max_position_embeddings == 64 and llama.vocab_size == VOCAB_SIZE
    mistral = LlamaConfig.from_hf(HF_CONFIGS["mistral-sliding"]().to_dict())
    assert (mistral.max_position_embeddings, mistral.sliding_window) == (64, 6)
    assert mistral.layer_types == ["sliding_attention"] * 2
    # Qwen2.5 checkpoints carry a sliding_window they do not use.
    qwen2 = LlamaConfig.from_hf({**HF_CONFIGS["qwen2-tied-sliding"]().to_dict(), "use_sliding_window": False,
                                 "layer_types": None})
    assert (qwen2.sliding_window, qwen2.layer_types, qwen2.qkv_bias, qwen2.o_proj_bias) == (
        None, ["full_attention"] * 2, True, False)
    gemma = LlamaConfig.from_hf({**HF_CONFIGS["gemma"]().to_dict(), "hidden_act": "gelu"})
    assert (gemma.hidden_act, gemma.head_dim, gemma.rms_norm_unit_offset, gemma.scale_embeddings) == (
        "gelu_pytorch_tanh", 24, True, True)
    gpt2 = GPT2Config.from_hf(HF_CONFIGS["gpt2"]().to_dict())
    assert (gpt2.num_layers, gpt2.num_kv_heads, gpt2.head_dim, gpt2.bos_token_id) == (2, 4, 16, 50256)


@pytest.mark.parametrize(("name", "architecture", "edit", "message"), [
    ("llama-gqa", "LlamaForCausalLM", {"hidden_act": "relu"}, "hidden_act 'relu'"),
    ("llama-gqa", "LlamaForCausalLM", {"layer_types": ["full_attention", "chunked_attention"]}, "layer_types"),
    ("gptj", "GPTJForCausalLM", {"activation_function": "relu"}, "activation_function 'relu'"),
    ("gptj", "GPTJForCausalLM", {"tie_word_embeddings": True}, "tied word embeddings"),
])
def test_configs_refuse_what_they_do_not_implement(name, architecture, edit, message):
    config_class = MODEL_REGISTRY[architecture].config_class
    with pytest.raises(NotImplementedError, match=message):
        config_class.from_hf({**HF_CONFIGS[name]().to_dict(), **edit})


def test_resolve_model_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a local checkpoint"):
        resolve_model_path(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="unknown built-in model"):
        resolve_model_path("builtin:huge")
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model_path(str(tmp_path)) == tmp_path


def test_kernels_are_installed_by_the_runner_seam_on_the_layers_that_take_them():
    """Llama's norms, attention (rotary) and SwiGLU take the element-wise kernels; Gemma's (1 + weight) norms and
    GeGLU keep torch's; GPT-2 has no such layer. The families carry no hook of their own for it."""
    kernels = built(native_elementwise)
    hf = HF_CONFIGS["llama-gqa"]().to_dict()  # 2 layers
    llama = Llama(LlamaConfig.from_hf(hf))
    assert install_kernels(llama, kernels) == 2 * 4 + 1  # per layer: 2 norms, attention, MLP; then the final norm
    assert all(module.kernels is kernels for module in llama.modules() if isinstance(module, UsesKernels))
    gemma = Llama(LlamaConfig.from_hf(hf | {"model_type": "gemma", "hidden_act": "gelu_pytorch_tanh"}))
    assert install_kernels(gemma, kernels) == 2  # attention's rotary only
    assert not any(hasattr(family, "use_elementwise_kernels") for family in MODEL_REGISTRY.values())
