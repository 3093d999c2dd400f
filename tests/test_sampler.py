"""The batched sampler: exact distributions under top-k / top-p, greedy rows, per-request seeds that no batch
changes, and rows that fail alone; then the same guarantees end to end through the engine."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from flover_backend import Engine, EngineConfig, SamplingParams
from flover_backend.native import sampling as native_sampling
from flover_backend.request import Request
from flover_backend.sampling.sampler import Sampler
from tests.native_kernels import built

NAN, INF = float("nan"), float("inf")
SIX_LOGITS = [2.0, 1.5, 1.0, 0.5, 0.0, -1.0]
# Chi-square critical values at significance 0.001 by degrees of freedom (the draws use fixed seeds, so a
# test passes or fails the same way every run; the bound only says how far from exact a pass allows).
CHI2_CRITICAL = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52}


@pytest.fixture(params=["torch-pass", "kernel-pass"])
def new_sampler(request):
    """Makes Samplers that run the sampling pass with torch's operators, or in the CPU kernel."""
    kernel = None
    if request.param == "kernel-pass":
        kernel = built(native_sampling)
    return lambda: Sampler(kernel=kernel)


def requests_for(params: list[SamplingParams]) -> list[Request]:
    return [Request(f"req-{i}", [1], p) for i, p in enumerate(params)]


def draw(new_sampler, logits: list[float], params: SamplingParams, num_requests: int = 2000,
         steps: int = 10) -> np.ndarray:
    """Token counts from `num_requests` requests (seeds 0..) drawing `steps` tokens each from fixed logits."""
    sampler = new_sampler()
    requests = requests_for([replace(params, seed=seed) for seed in range(num_requests)])
    batch = torch.tensor(logits).expand(num_requests, -1).contiguous()
    counts = np.zeros(len(logits))
    for _ in range(steps):
        out = sampler(batch, requests)
        assert not out.errors
        counts += np.bincount(out.token_ids, minlength=len(logits))
    return counts


def assert_matches(counts: np.ndarray, expected: dict[int, float]) -> None:
    """Only the expected tokens are drawn, in proportions a chi-square test accepts."""
    kept = sorted(expected)
    assert counts.sum() == counts[kept].sum(), f"drew tokens outside {kept}: {np.nonzero(counts)[0]}"
    want = np.array([expected[t] for t in kept]) * counts.sum()
    chi2 = (((counts[kept] - want) ** 2) / want).sum()
    assert chi2 < CHI2_CRITICAL[len(kept) - 1], (chi2, counts[kept] / counts.sum(), want / counts.sum())


def renormalized(logits: dict[int, float], temperature: float = 1.0) -> dict[int, float]:
    """softmax over the kept tokens only: the distribution a top-k / top-p cut leaves."""
    weights = {t: np.exp(v / temperature) for t, v in logits.items()}
    total = sum(weights.values())
    return {t: w / total for t, w in weights.items()}


def test_temperature_alone_follows_the_softmax(new_sampler):
    counts = draw(new_sampler, SIX_LOGITS, SamplingParams(temperature=0.7))
    assert_matches(counts, renormalized(dict(enumerate(SIX_LOGITS)), temperature=0.7))


def test_top_k_keeps_the_k_most_likely(new_sampler):
    # Kept: logits 2.0, 1.5, 1.0 -> e^2, e^1.5, e^1 over their sum = 0.5065, 0.3072, 0.1863.
    counts = draw(new_sampler, SIX_LOGITS, SamplingParams(temperature=1.0, top_k=3))
    assert_matches(counts, {0: 0.5065, 1: 0.3072, 2: 0.1863})


def test_top_p_keeps_the_smallest_set_reaching_p(new_sampler):
    # softmax = .4197 .2546 .1544 .0936 .0568 .0209; mass before each: 0 .4197 .6743 .8287 .9223: under 0.85 for
    # the first four, so those stay: .4197 .2546 .1544 .0936 over .9223.
    counts = draw(new_sampler, SIX_LOGITS, SamplingParams(temperature=1.0, top_p=0.85))
    assert_matches(counts, {0: 0.4551, 1: 0.2760, 2: 0.1674, 3: 0.1015})


def test_top_p_applies_within_top_k(new_sampler):
    # At temperature 2, top_k 5 keeps logits 2 .. 0: weights e^(v/2) = 2.718 2.117 1.649 1.284 1.000, total 8.768,
    # so p = .3100 .2414 .1881 .1465 .1141; mass before: 0 .3100 .5514 .7395: under 0.6 for the first three.
    counts = draw(new_sampler, SIX_LOGITS, SamplingParams(temperature=2.0, top_k=5, top_p=0.6))
    assert_matches(counts, renormalized({0: 2.0, 1: 1.5, 2: 1.0}, temperature=2.0))


def test_kept_tokens_spread_over_many_blocks(new_sampler):
    """A vocabulary of 1000 (8 blocks of 128, the last padded): the race between blocks is exact too."""
    logits = [-30.0] * 1000
    spread = {3: 1.0, 200: 2.0, 390: 0.5, 777: 1.5, 999: 0.0}
    for token_id, value in spread.items():
        logits[token_id] = value
    assert_matches(draw(new_sampler, logits, SamplingParams(temperature=1.0)), renormalized(spread))
    assert_matches(draw(new_sampler, logits, SamplingParams(temperature=1.0, top_k=3)),
                   renormalized({200: 2.0, 777: 1.5, 3: 1.0}))


def test_many_small_tokens_outweigh_one_large_one(new_sampler):
    """Block 0 holds one token of logit 1, block 1 a hundred of logit 0: the race between blocks weighs whole
    blocks, not their best tokens (e / (e + 100) = 0.0265 for the lone token)."""
    logits = [-30.0] * 256
    logits[0] = 1.0
    logits[128:228] = [0.0] * 100
    counts = draw(new_sampler, logits, SamplingParams(temperature=1.0))
    lone = np.e / (np.e + 100)
    assert_matches(np.array([counts[0], counts[128:228].sum()]), {0: lone, 1: 1 - lone})
    assert counts.sum() == counts[0] + counts[128:228].sum()


def test_ties_with_the_kth_stay(new_sampler):
    counts = draw(new_sampler, [1.0, 3.0, 1.0, 0.0, 1.0], SamplingParams(temperature=1.0, top_k=2))
    assert_matches(counts, renormalized({0: 1.0, 1: 3.0, 2: 1.0, 4: 1.0}))


@pytest.mark.parametrize("temperature", [0.0, 1e-38, 1e-6])
def test_zero_and_tiny_temperatures_take_the_argmax(new_sampler, temperature):
    logits = torch.randn(8, 32000, generator=torch.Generator().manual_seed(3)) * 1e3  # overflows at 1e-38
    params = [SamplingParams(temperature=temperature, seed=i) for i in range(8)]
    assert all(p.greedy for p in params)
    out = new_sampler()(logits, requests_for(params))
    assert out.token_ids == logits.argmax(-1).tolist() and not out.errors


def random_logits(num_rows: int, seed: int, vocab: int = 32000, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(num_rows, vocab, generator=torch.Generator().manual_seed(seed)) * scale


def run_steps(new_sampler, requests: list[Request], logits_per_step: list[torch.Tensor]) -> list[list[int]]:
    """Each request's tokens over the steps, from one sampler."""
    sampler = new_sampler()
    return np.array([sampler(logits, requests).token_ids for logits in logits_per_step]).T.tolist()


def test_a_seed_repeats_and_other_seeds_differ(new_sampler):
    steps = [random_logits(1, seed).expand(3, -1).contiguous() for seed in range(6)]
    params = [SamplingParams(temperature=1.0, top_k=50, seed=s) for s in (5, 5, 6)]
    tokens = run_steps(new_sampler, requests_for(params), steps)
    assert tokens[0] == tokens[1] != tokens[2]


TARGETS = [SamplingParams(temperature=0.9, seed=41),
           SamplingParams(temperature=0.8, top_k=40, seed=42),
           SamplingParams(temperature=1.2, top_p=0.9, seed=43),
           SamplingParams(temperature=0.7, top_k=200, top_p=0.8, seed=44)]


@pytest.mark.parametrize("target", TARGETS, ids=["temperature", "top_k", "top_p", "top_k+top_p"])
def test_a_row_draws_the_same_alone_or_in_any_batch(new_sampler, target):
    """Same logits and seed: the same tokens alone, and at another place among rows of every other kind."""
    others = [SamplingParams(), SamplingParams(temperature=1.0, top_k=1000, seed=1),
              SamplingParams(temperature=2.0, top_p=0.5, seed=2), SamplingParams(temperature=0.5, top_k=3, seed=3),
              SamplingParams(temperature=1.0, seed=4), SamplingParams(temperature=0.3, top_k=7, top_p=0.95)]
    steps = [random_logits(1 + len(others), seed) for seed in range(8)]
    steps[3][0] *= 0.05  # a flat step: its nucleus outgrows the first window
    alone = run_steps(new_sampler, requests_for([target]), [logits[:1] for logits in steps])
    for place in (0, 3, len(others)):
        params = others[:place] + [target] + others[place:]
        moved = [torch.cat([logits[1:place + 1], logits[:1], logits[place + 1:]]) for logits in steps]
        assert run_steps(new_sampler, requests_for(params), moved)[place] == alone[0]


def test_wide_nucleus_keeps_exactly_the_top_p_mass(new_sampler):
    """Nuclei wider than the first window (and than the second) are cut where a full sort cuts them."""
    logits = torch.cat([random_logits(2, 9, scale=1.0), random_logits(2, 10, scale=2.5)])
    params = [SamplingParams(temperature=1.0, top_p=0.5, seed=s) for s in range(4)]
    sampler, requests = new_sampler(), requests_for(params)
    probs = logits.softmax(-1).double()
    ordered, order = probs.sort(-1, descending=True)
    nucleus_size = ((ordered.cumsum(-1) - ordered) < 0.5).sum(-1)
    assert nucleus_size.min() > 64 and nucleus_size.max() > 1024
    for _ in range(50):
        for row, token_id in enumerate(sampler(logits, requests).token_ids):
            assert token_id in order[row, :nucleus_size[row]].tolist()


def allowed(logits: torch.Tensor, params: SamplingParams, slack: float = 1e-3) -> set[int]:
    """The tokens a top-k / top-p cut keeps, computed plainly in float64 (top_p widened by `slack` to absorb
    float32 rounding at the edge)."""
    values = logits.double()
    keep = torch.ones_like(values, dtype=torch.bool)
    if params.top_k:
        keep &= values >= values.sort(descending=True).values[params.top_k - 1]
    if params.top_p < 1.0:
        kept = (values[keep] / params.temperature).softmax(-1).sort(descending=True)
        before = kept.values.cumsum(-1) - kept.values
        edge = values[keep][kept.indices[(before < params.top_p + slack).sum() - 1]]
        keep &= values >= edge
    return set(keep.nonzero()[:, 0].tolist())


def test_drawn_tokens_stay_inside_the_cut_even_among_ties(new_sampler):
    """bfloat16-rounded logits tie often, at the k-th and at the nucleus' edge."""
    params = [SamplingParams(temperature=t, top_k=k, top_p=p, seed=i)
              for i, (t, k, p) in enumerate([(1.0, 1, 1.0), (0.7, 5, 1.0), (1.0, 50, 0.9), (1.5, 200, 0.5),
                                             (0.9, 0, 0.5), (1.0, 0, 0.95), (0.5, 3, 0.3), (2.0, 1000, 1.0)])]
    sampler, requests = new_sampler(), requests_for(params)
    for step in range(6):
        logits = random_logits(len(params), 20 + step, scale=2.0).bfloat16().float()
        for row, token_id in enumerate(sampler(logits, requests).token_ids):
            assert token_id in allowed(logits[row], params[row]), (step, params[row])


def test_a_row_that_cannot_be_sampled_fails_alone(new_sampler):
    logits = random_logits(6, 0)
    logits[1, 17] = NAN  # sampled
    logits[2, 5] = NAN  # greedy
    logits[3, 9] = INF
    logits[4] = logits[4] / 3.0 + 3e34  # finite, but inf once divided by the temperature
    params = [SamplingParams(temperature=1.0, top_k=20, seed=0), SamplingParams(temperature=1.0, seed=1),
              SamplingParams(), SamplingParams(temperature=0.5, top_p=0.9, seed=3),
              SamplingParams(temperature=1e-5, seed=4), SamplingParams(temperature=0.9, seed=5)]
    out = new_sampler()(logits, requests_for(params))
    assert sorted(out.errors) == [1, 2, 3, 4]
    assert all("not finite" in message for message in out.errors.values())
    healthy = new_sampler()(logits[[0, 5]], requests_for([params[0], params[5]])).token_ids
    assert [out.token_ids[0], out.token_ids[5]] == healthy


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_same_tokens_from_logits_on_the_gpu():
    """The pass runs where the logits are; the noise comes from CPU generators, so a seed draws alike on both."""
    params = [SamplingParams(), *TARGETS, SamplingParams(temperature=1.0, top_k=3, top_p=0.5, seed=9)]
    steps = [random_logits(len(params), seed) for seed in range(4)]
    steps[1][2] = NAN
    on_cpu = run_steps(Sampler, requests_for(params), steps)
    assert run_steps(Sampler, requests_for(params), [logits.cuda() for logits in steps]) == on_cpu


# ----- through the engine -----

def engine_config(**overrides) -> EngineConfig:
    return EngineConfig(**{"model": "builtin:tiny", "max_num_seqs": 32, "max_model_len": 96, "num_threads": 1,
                           **overrides})


class Recorder:
    """Collects one engine's outputs per request, and the arena rows a request was seen in."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.outputs: dict[str, list] = {}
        self.rows: dict[str, set[int]] = {}

    def add(self, prompt: str, params: SamplingParams) -> str:
        def on_output(output):
            self.outputs.setdefault(output.req_id, []).append(output)
            request = self.engine.scheduler.running.get(output.req_id)
            if request is not None:
                self.rows.setdefault(output.req_id, set()).add(request.row)
        return self.engine.add_request(prompt, params, on_output=on_output)

    def tokens(self, req_id: str) -> list[int]:
        return [t for output in self.outputs[req_id] for t in output.new_token_ids]

    def final(self, req_id: str):
        return self.outputs[req_id][-1]


def alone(prompt: str, params: SamplingParams) -> list[int]:
    recorder = Recorder(Engine(engine_config()))
    req_id = recorder.add(prompt, params)
    recorder.engine.run_until_idle()
    return recorder.tokens(req_id)


ENGINE_TARGETS = [replace(params, max_tokens=24, ignore_eos=True) for params in TARGETS]


def test_seeded_requests_same_alone_and_in_a_batch_of_32_that_compacts():
    engine = Engine(engine_config())
    recorder = Recorder(engine)
    kinds = [SamplingParams(ignore_eos=True), SamplingParams(temperature=0.8, seed=100, ignore_eos=True),
             SamplingParams(temperature=1.0, top_k=5, ignore_eos=True),
             SamplingParams(temperature=0.6, top_p=0.7, ignore_eos=True),
             SamplingParams(temperature=1.3, top_k=64, top_p=0.95, seed=7, ignore_eos=True)]
    # Shorter than the targets, so they finish first and compaction moves the targets down into their rows.
    for i in range(28):
        recorder.add(f"other request {i}", replace(kinds[i % 5], max_tokens=3 + i % 9))
    targets = [recorder.add(f"target {i}", params) for i, params in enumerate(ENGINE_TARGETS)]
    for _ in range(5):
        engine.step()
    late = [recorder.add(f"late {i}", replace(kinds[i % 5], max_tokens=6)) for i in range(8)]
    engine.run_until_idle()
    assert max(record.num_decode for record in engine.stats.iterations) == 32
    for i, (req_id, params) in enumerate(zip(targets, ENGINE_TARGETS)):
        assert len(recorder.rows[req_id]) > 1, "compaction never moved this target"
        assert recorder.tokens(req_id) == alone(f"target {i}", params), params
    assert all(recorder.final(req_id).finish_reason == "length" for req_id in late)


class PoisonedSampler:
    """Gives one request NaN logits from its `at`-th token on; everything else goes to the real sampler."""

    def __init__(self, sampler: Sampler, req_id: str, at: int):
        self.sampler, self.req_id, self.at = sampler, req_id, at

    def __call__(self, logits, requests):
        logits = logits.clone()
        for row, request in enumerate(requests):
            if request.req_id == self.req_id and request.num_output_tokens >= self.at:
                logits[row] = NAN
        return self.sampler(logits, requests)

    def release(self, req_id: str) -> None:
        self.sampler.release(req_id)


@pytest.mark.parametrize("victim_params", [SamplingParams(max_tokens=10, ignore_eos=True),
                                           SamplingParams(max_tokens=10, ignore_eos=True, temperature=0.8, seed=1)],
                         ids=["greedy", "sampled"])
def test_nan_logits_fail_their_request_alone(victim_params):
    jobs = [("first", SamplingParams(max_tokens=10, ignore_eos=True)),
            ("second", SamplingParams(max_tokens=10, ignore_eos=True, temperature=0.9, top_k=30, seed=5))]
    engine = Engine(engine_config())
    recorder = Recorder(engine)
    others = [recorder.add(prompt, params) for prompt, params in jobs]
    victim = recorder.add("victim", victim_params)
    engine.runner.sampler = PoisonedSampler(engine.runner.sampler, victim, at=3)
    engine.run_until_idle()
    final = recorder.final(victim)
    assert final.finish_reason == "error" and "not finite" in final.error
    assert recorder.tokens(victim) == alone("victim", victim_params)[:3] and final.num_output_tokens == 3
    for req_id, (prompt, params) in zip(others, jobs):
        assert recorder.final(req_id).finish_reason == "length"
        assert recorder.tokens(req_id) == alone(prompt, params)


def test_tiny_temperature_runs_as_greedy_beside_others():
    engine = Engine(engine_config())
    recorder = Recorder(engine)
    tiny = recorder.add("hello", SamplingParams(max_tokens=12, ignore_eos=True, temperature=1e-38))
    greedy = recorder.add("hello", SamplingParams(max_tokens=12, ignore_eos=True))
    sampled = recorder.add("hello", SamplingParams(max_tokens=12, ignore_eos=True, temperature=1.0, seed=3))
    engine.run_until_idle()
    assert all(recorder.final(req_id).finish_reason == "length" for req_id in (tiny, greedy, sampled))
    assert recorder.tokens(tiny) == recorder.tokens(greedy) != recorder.tokens(sampled)
