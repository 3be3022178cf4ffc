"""DISA inside veRL, through veRL's own code: reward -> ``apply_kl_penalty`` -> ``compute_advantage`` (our
registered estimator) -> the engine's ``forward_backward_batch`` -> the actor's ``ppo_loss`` -> our registered
policy loss, against our ``disa`` objective on the whole mini-batch.

veRL 0.9 pins ``transformers<5.11`` and would downgrade the main environment, so this file runs in its own
(``.ci/verl_check.sh`` builds ``.venv-verl``) and is skipped wherever veRL is not installed.

What is veRL's and what is ours here: the reward layout (score at each response's last token) is veRL's naive
reward manager's; ``apply_kl_penalty``, ``compute_advantage``, ``left_right_2_no_padding``, ``DataProto.chunk``
(how the trainer shards a batch over data-parallel ranks), ``FSDPEngine.forward_backward_batch`` (micro-batch
split, ``dp_size`` / ``batch_num_tokens``, one backward per micro-batch), ``ppo_loss`` and
``no_padding_2_padding`` are veRL's, imported. Ours: a bigram "model" in ``forward_step`` (the FSDP engine only
registers for CUDA/NPU, see ``test_what_stops_veRL_s_trainer_on_CPU``), and the simulation of ranks: each rank's
shard runs in this one process with ``dp_size`` set, and the ranks' gradients are averaged as FSDP/DDP's
reduce-scatter/all-reduce does.
"""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("verl.trainer.ppo.ray_trainer")
warnings.filterwarnings("ignore", category=UserWarning)

import torch.distributed as dist  # noqa: E402
from tensordict import TensorDict  # noqa: E402
from verl import DataProto  # noqa: E402
from verl.trainer.config import AlgoConfig  # noqa: E402
from verl.trainer.config.algorithm import KLControlConfig  # noqa: E402
from verl.trainer.ppo import core_algos  # noqa: E402
from verl.trainer.ppo.ray_trainer import apply_kl_penalty, compute_advantage  # noqa: E402
from verl.utils import tensordict_utils as tu  # noqa: E402
from verl.workers.config import FSDPActorConfig, PolicyLossConfig  # noqa: E402
from verl.workers.engine.fsdp import transformer_impl  # noqa: E402
from verl.workers.engine.fsdp.transformer_impl import FSDPEngine  # noqa: E402
from verl.workers.utils.losses import ppo_loss  # noqa: E402
from verl.workers.utils.padding import left_right_2_no_padding  # noqa: E402

import disa.integrations.verl as disa_verl  # noqa: E402
from disa.integrations.verl import NAME, disa_reward, verl_extra_info  # noqa: E402
from disa.objectives import compute_objective  # noqa: E402

BETA = 4.0
VOCAB = 13
G = 16  # rollouts in the mini-batch, over all ranks (veRL's global_batch_size = ppo_mini_batch_size * n)


@pytest.fixture(scope="module", autouse=True)
def process_group(tmp_path_factory):
    """A one-process gloo group: the engine all-reduces ``batch_num_tokens`` over it (ranks are simulated).

    veRL 0.9 has no CPU platform (its detection falls back to NVIDIA), so the engine's ``get_device_id()``
    would call ``torch.cuda.current_device()``: inside the engine module only, it answers ``"cpu"``.
    """
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"file://{tmp_path_factory.mktemp('pg')}/store",
                                rank=0, world_size=1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(transformer_impl, "get_device_id", lambda: "cpu")
        yield


class Bigram(torch.nn.Module):
    """``log p(next | token)`` from a ``V x V`` logit table: enough of a model for gradients to compare."""

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.table = torch.nn.Parameter(torch.randn(VOCAB, VOCAB, generator=g, dtype=torch.float64))

    def next_logp(self, ids: torch.Tensor) -> torch.Tensor:
        """``(N,)`` token ids -> ``(N - 1,)`` log-probs of each following token."""
        return torch.log_softmax(self.table[ids[:-1]], dim=-1).gather(-1, ids[1:, None]).squeeze(-1)


class CPUEngine(FSDPEngine):
    """veRL's ``FSDPEngine`` with its model call replaced by a bigram on packed (no-padding) sequences.

    Everything else ``forward_backward_batch`` does is veRL's; ``dp_size`` is the simulated rank count.
    """

    def __init__(self, model: Bigram, dp_size: int):  # noqa: D107 - no FSDP wrapping, no device mesh
        self.module, self.dp_size, self.scaler = model, dp_size, None
        self.ulysses_sequence_parallel_size = 1
        self.engine_config = None

    def get_data_parallel_size(self):
        return self.dp_size

    def get_data_parallel_rank(self):
        return 0

    def get_data_parallel_group(self):
        return None  # the default (one-process) group

    def forward_step(self, micro_batch: TensorDict, loss_function, forward_only):
        ids = micro_batch["input_ids"]  # nested (jagged): one packed sequence per rollout
        flat = ids.values()
        # position j holds log p(token j+1 | token j) as veRL's log_probs do; the last position of each
        # sequence is never read (no_padding_2_padding slices [end - resp_len - 1, end - 1))
        logp = torch.cat([self.module.next_logp(flat), flat.new_zeros(1, dtype=torch.float64)])
        model_output = {"log_probs": torch.nested.nested_tensor_from_jagged(logp, offsets=ids.offsets())}
        loss, metrics = loss_function(model_output=model_output, data=micro_batch, dp_group=None)
        return loss, {"model_output": {k: v.detach() for k, v in model_output.items()}, "loss": loss.item(),
                      "metrics": metrics}


def rollout_batch(model: Bigram, seed=0):
    """G rollouts in veRL's padded layout (left-padded prompts, right-padded responses) and our view of them."""
    g = torch.Generator().manual_seed(seed)
    P, R = 4, 6
    prompt_len = torch.randint(1, P + 1, (G,), generator=g)
    resp_len = torch.randint(1, R + 1, (G,), generator=g)
    resp_len[0] = R  # one full-length response
    prompts = torch.zeros(G, P, dtype=torch.long)
    responses = torch.zeros(G, R, dtype=torch.long)
    attn = torch.zeros(G, P + R, dtype=torch.long)
    for i in range(G):
        prompts[i, P - prompt_len[i]:] = torch.randint(1, VOCAB, (int(prompt_len[i]),), generator=g)
        responses[i, :resp_len[i]] = torch.randint(1, VOCAB, (int(resp_len[i]),), generator=g)
        attn[i, P - prompt_len[i]:P + resp_len[i]] = 1
    response_mask = attn[:, P:].clone()
    position_ids = (attn.cumsum(-1) - 1).clamp(min=0) * attn
    with torch.no_grad():
        logp = response_logp(model, prompts, responses, attn)
    # pi_old a little off the current policy (so the clipped IS weight is not 1), pi_ref further off
    old = (logp + 0.05 * torch.randn(G, R, generator=g, dtype=torch.float64)) * response_mask
    ref = (logp - 0.3 * torch.rand(G, R, generator=g, dtype=torch.float64)) * response_mask
    raw = torch.randint(0, 2, (G,), generator=g).double()
    log_z = torch.randn(G, generator=g, dtype=torch.float64)
    scale, shift = 1.0 + torch.rand(G, generator=g, dtype=torch.float64), -0.5 * torch.rand(G, generator=g).double()
    info = [verl_extra_info(float(z), BETA, float(a), float(b)) for z, a, b in zip(log_z, scale, shift)]
    scores = torch.zeros(G, R, dtype=torch.float64)  # veRL's reward managers put the score on the last token
    scores[torch.arange(G), resp_len - 1] = torch.tensor([disa_reward(float(r), x) for r, x in zip(raw, info)],
                                                         dtype=torch.float64)
    data = DataProto.from_dict(tensors={
        "prompts": prompts, "responses": responses, "input_ids": torch.cat([prompts, responses], -1),
        "attention_mask": attn, "position_ids": position_ids, "response_mask": response_mask,
        "old_log_probs": old, "ref_log_prob": ref, "token_level_scores": scores})
    ours = {"old_logp": old, "ref_logp": ref, "mask": response_mask.double(), "rewards": scale * raw + shift,
            "log_z": log_z}
    return data, ours


def response_logp(model: Bigram, prompts, responses, attn) -> torch.Tensor:
    """Our own padded ``(G, R)`` response log-probs, computed row by row (not through veRL's packing)."""
    ids = torch.cat([prompts, responses], -1)
    rows = []
    for i in range(ids.shape[0]):
        valid = ids[i][attn[i].bool()]
        n_resp = int(attn[i, prompts.shape[1]:].sum())
        rows.append(torch.nn.functional.pad(model.next_logp(valid)[-n_resp:], (0, responses.shape[1] - n_resp)))
    return torch.stack(rows)


def algo_config():
    return AlgoConfig(adv_estimator=NAME, use_kl_in_reward=True, kl_penalty="kl",
                      kl_ctrl=KLControlConfig(type="fixed", kl_coef=1 / BETA))


def advantages(data: DataProto) -> DataProto:
    """veRL's own KL-in-reward and advantage step with our registered estimator."""
    data, _ = apply_kl_penalty(data, core_algos.get_kl_controller(algo_config().kl_ctrl), kl_penalty="kl")
    return compute_advantage(data, adv_estimator=NAME, config=algo_config())


def actor_config(**kw):
    kw = {"strategy": "fsdp", "ppo_mini_batch_size": G, "ppo_micro_batch_size_per_gpu": 1, "rollout_n": 1,
          "policy_loss": PolicyLossConfig(loss_mode=NAME), "entropy_coeff": 0.0, "use_kl_loss": False, **kw}
    return FSDPActorConfig(**kw)


def our_loss_and_grad(model: Bigram, data: DataProto, ours: dict):
    """Our ``disa`` objective over the whole mini-batch: the number every veRL path must reproduce."""
    model.zero_grad()
    b = data.batch
    logp = response_logp(model, b["prompts"], b["responses"], b["attention_mask"])
    loss, _ = compute_objective("disa", inputs={"logp": logp, **ours}, beta=BETA)
    loss.backward()
    return float(loss.detach()), model.table.grad.clone()


def engine_step(model: Bigram, data: DataProto, dp_size: int, micro_per_rank: int | None = None,
                max_token_len: int | None = None, config=None):
    """One mini-batch through veRL's engine on ``dp_size`` simulated ranks: (loss, rank-averaged gradient).

    As veRL's trainer does: shard with ``DataProto.chunk`` (the dispatch), ``to_tensordict`` +
    ``left_right_2_no_padding`` (``_update_actor``), ``global_batch_size`` = the mini-batch's rollout count.
    """
    config = config or actor_config()
    grads, loss = [], 0.0
    for shard in data.chunk(dp_size):
        td = left_right_2_no_padding(shard.to_tensordict())
        if max_token_len is None:
            tu.assign_non_tensor(td, use_dynamic_bsz=False, micro_batch_size_per_gpu=len(shard) // micro_per_rank)
        else:
            tu.assign_non_tensor(td, use_dynamic_bsz=True, max_token_len_per_gpu=max_token_len)
        tu.assign_non_tensor(td, global_batch_size=len(data))
        model.zero_grad()
        out = CPUEngine(model, dp_size).forward_backward_batch(td, lambda **kw: ppo_loss(config, **kw))
        grads.append(model.table.grad.clone())
        loss += sum(out["loss"]) / dp_size  # each rank's backward losses add up; ranks are averaged
    return loss, torch.stack(grads).mean(0)


@pytest.mark.parametrize("dp_size", [1, 2, 4])
@pytest.mark.parametrize("micro_per_rank", [1, 2, 4])
def test_engine_path_equals_our_objective_at_every_micro_batch_and_dp_split(dp_size, micro_per_rank):
    model = Bigram()
    data, ours = rollout_batch(model)
    data = advantages(data)
    want_loss, want_grad = our_loss_and_grad(model, data, ours)
    loss, grad = engine_step(model, data, dp_size, micro_per_rank)
    assert loss == pytest.approx(want_loss, rel=1e-5)
    assert torch.allclose(grad, want_grad, rtol=1e-5, atol=1e-7 * float(want_grad.abs().max()))


def test_engine_path_with_dynamic_batch_sizes_uneven_micro_batches(monkeypatch):
    """``use_dynamic_bsz``: veRL packs micro-batches by token budget, so they hold different rollout counts;
    only a global normalisation makes them add up to the mini-batch mean."""
    model = Bigram()
    data, ours = rollout_batch(model, seed=1)
    data = advantages(data)
    want_loss, want_grad = our_loss_and_grad(model, data, ours)
    sizes, scale = [], disa_verl.global_batch_scale
    monkeypatch.setattr(disa_verl, "global_batch_scale", lambda n, config: sizes.append(n) or scale(n, config))
    loss, grad = engine_step(model, data, dp_size=2, max_token_len=20)
    assert sum(sizes) == G and len(set(sizes)) > 1  # uneven micro-batches, every rollout once
    assert loss == pytest.approx(want_loss, rel=1e-5)
    assert torch.allclose(grad, want_grad, rtol=1e-5, atol=1e-7 * float(want_grad.abs().max()))


def test_a_micro_batch_mean_would_scale_the_update_by_the_micro_batch_count(monkeypatch):
    """The negative control: the previous loss (a plain micro-batch mean) is M x the objective under veRL 0.9."""
    model = Bigram()
    data, ours = rollout_batch(model)
    data = advantages(data)
    _, want_grad = our_loss_and_grad(model, data, ours)
    monkeypatch.setattr(disa_verl, "global_batch_scale", lambda n, config: 1.0)
    _, grad = engine_step(model, data, dp_size=2, micro_per_rank=4)
    assert torch.allclose(grad, 4 * want_grad, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("micro_per_rank", [1, 2, 4])
def test_legacy_dp_actor_scaling_equals_our_objective(micro_per_rank):
    """veRL <= 0.7's ``dp_actor.update_policy`` (removed in 0.8) called the policy loss with an empty
    ``global_batch_info`` and scaled each micro-batch's result by ``1 / gradient_accumulation``
    (``ppo_mini_batch_size // ppo_micro_batch_size_per_gpu``) before ``backward``; FSDP averaged ranks. That loop
    is re-enacted here (it is not in the installed veRL) around veRL 0.9's registered loss lookup."""
    model = Bigram()
    data, ours = rollout_batch(model)
    data = advantages(data)
    want_loss, want_grad = our_loss_and_grad(model, data, ours)
    fn, config, dp_size = core_algos.get_policy_loss_fn(NAME), actor_config(), 2
    grads, loss = [], 0.0
    for shard in data.chunk(dp_size):
        model.zero_grad()
        for micro in shard.chunk(micro_per_rank):
            b = micro.batch
            logp = response_logp(model, b["prompts"], b["responses"], b["attention_mask"])
            pg_loss, _ = fn(old_log_prob=b["old_log_probs"], log_prob=logp, advantages=b["advantages"],
                            response_mask=b["response_mask"], loss_agg_mode="token-mean", config=config)
            (pg_loss / micro_per_rank).backward()
            loss += float(pg_loss) / micro_per_rank / dp_size
        grads.append(model.table.grad.clone())
    assert loss == pytest.approx(want_loss, rel=1e-5)
    assert torch.allclose(torch.stack(grads).mean(0), want_grad, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("setting,match", [({"entropy_coeff": 0.01}, "entropy_coeff"),
                                           ({"use_kl_loss": True}, "use_kl_loss")])
def test_actor_settings_that_add_non_TB_terms_are_refused_inside_ppo_loss(setting, match):
    model = Bigram()
    data, _ = rollout_batch(model)
    with pytest.raises(ValueError, match=match):
        engine_step(model, advantages(data), dp_size=1, micro_per_rank=1, config=actor_config(**setting))


def test_rollout_correction_weights_and_unnormalisable_dp_are_refused():
    fn = core_algos.get_policy_loss_fn(NAME)
    mask = torch.ones(2, 3)
    args = dict(old_log_prob=-torch.ones(2, 3), log_prob=-torch.ones(2, 3), advantages=torch.zeros(2, 3),
                response_mask=mask)
    with pytest.raises(ValueError, match="rollout_is_weights"):
        fn(**args, config=actor_config(), rollout_is_weights=torch.ones(2, 3))
    config = actor_config()
    config.global_batch_info.update(dp_size=2, global_batch_size=None)
    with pytest.raises(ValueError, match="global_batch_size"):
        fn(**args, config=config)


def test_registered_loss_on_a_fixed_batch_by_hand():
    """The residual veRL's plumbing hands the loss equals eq. 5 for one rollout, computed by hand."""
    model = Bigram()
    data, ours = rollout_batch(model)
    data = advantages(data)
    b = data.batch
    i, m = 3, b["response_mask"][3].bool()
    delta_old = float(b["advantages"][i][m][0])
    by_hand = float(ours["log_z"][i] + b["old_log_probs"][i][m].sum() - BETA * ours["rewards"][i]
                    - b["ref_log_prob"][i][m].sum())
    assert delta_old == pytest.approx(by_hand, abs=1e-9)
    assert torch.all(b["advantages"][i][~m] == 0)


def test_estimator_refuses_a_KL_setup_that_does_not_carry_log_pi_ref():
    fn = core_algos.get_adv_estimator_fn(NAME)
    for algo in (AlgoConfig(use_kl_in_reward=False), AlgoConfig(use_kl_in_reward=True, kl_penalty="low_var_kl")):
        with pytest.raises(ValueError, match="use_kl_in_reward"):
            fn(token_level_rewards=torch.zeros(3, 4), response_mask=torch.ones(3, 4), config=algo)


def test_reward_wrapper_needs_the_log_z_columns():
    with pytest.raises(KeyError, match="disa_log_z"):
        disa_reward(1.0, {})
    assert disa_reward(1.0, verl_extra_info(log_z=2.0, beta=4.0)) == pytest.approx(0.5)


def test_what_stops_veRL_s_trainer_on_CPU():
    """docs/engines.md says why veRL's trainer does not run here; this pins the reasons to the installed veRL,
    so a release that lifts them fails this test (then try ``main_ppo`` on CPU): no CPU platform (detection
    falls back to NVIDIA, and the device calls go to CUDA), training engines registered for CUDA/NPU only,
    and rollouts only through vLLM/SGLang/TensorRT-LLM servers (the HF rollout is not registered)."""
    from verl.utils.device import get_device_id, get_device_name
    from verl.workers.engine.base import EngineRegistry
    from verl.workers.rollout.base import get_rollout_class

    assert not torch.cuda.is_available()
    assert get_device_name() == "cuda"
    with pytest.raises((AssertionError, RuntimeError)):  # CPU torch: "Torch not compiled with CUDA enabled"
        get_device_id()
    engines = EngineRegistry._engines["language_model"]
    assert {"fsdp", "fsdp2"} <= set(engines)
    for backend, by_device in engines.items():  # keys: a device, or (device, vendor)
        assert "cpu" not in {k[0] if isinstance(k, tuple) else k for k in by_device}, backend
    for name in ("hf", "naive"):
        with pytest.raises(AssertionError, match="not found"):
            get_rollout_class(name)
