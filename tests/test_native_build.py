"""The C kernels where no compiler works: neither is built, the log says so, and the engine serves the same
tokens on torch's operators."""


from flover_backend import EngineConfig, SamplingParams
from flover_backend.execution.kv_arena import KVArena
from tests.test_engine import PROMPTS, run_staggered, token_ids


def test_without_a_compiler_the_engine_serves_the_same_tokens_on_torch(tmp_path, monkeypatch, caplog):
    jobs = [(prompt, SamplingParams(max_tokens=6 + i, ignore_eos=True)) for i, prompt in enumerate(PROMPTS[:4])]
    jobs += [(prompt, SamplingParams(max_tokens=6 + i, ignore_eos=True, temperature=0.9, top_p=0.8, top_k=20 * i,
                                     seed=i)) for i, prompt in enumerate(PROMPTS[4:])]

    def serve() -> tuple[list[list[int]], list[bool]]:
        kernels = []
        outputs = run_staggered(EngineConfig(model="builtin:tiny", max_num_seqs=4, num_threads=1), jobs,
                                prepare=lambda engine: kernels.extend(
                                    [engine.runner.attention_kernel is not None, engine.runner.sampler.kernel is not None,
                                     _position_major(engine.runner.arena),
                                     engine.runner.model.model.norm.kernels is not None,
                                     engine.runner.model.lm_head.small_gemm is not None]))
        return [token_ids(output) for output in outputs], kernels

    with_kernels, used = serve()
    assert used == [True, True, True, True, True]  # the attention kernel gets the position-major arena it streams
    monkeypatch.setenv("CC", "false")  # a compiler that always fails
    monkeypatch.setenv("FLOVER_HOME", str(tmp_path))  # where no kernel was built before
    without_kernels, used = serve()
    assert used == [False, False, False, False, False] and not list((tmp_path / "kernels").glob("*.so"))
    assert all(f"{kernel}.c is unavailable" in caplog.text for kernel in ("decode_attention", "sampling", "elementwise",
                                                                       "small_gemm"))
    assert without_kernels == with_kernels


def _position_major(arena: KVArena) -> bool:
    """Whether the arena stores positions outside heads: a layer's keys (rows, nkv, max_len, hd) step heads faster."""
    keys, _ = arena.layer(0)
    return keys.stride(1) < keys.stride(2)
