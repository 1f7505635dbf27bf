"""Policy-gradient losses for asynchronous RL: GRPO advantages, truncated IS (AIPO/TIS), AReaL decoupled PPO.

    adv = group_advantages(rewards, group_size=8)                        # (N,) one per completion
    inputs, batch = train_batch(seqs.tokens, seqs.mask, seqs.behaviour_logprobs, adv)
    loss_fn = PolicyLoss("tis", temperature=1.0, options={"rho": 2.0})  # or "decoupled_ppo"
    parts = parallelize(build, plan, mesh, device, optim, loss_fn=loss_fn)
    parts.train_step(inputs, batch, lr)                                   # loss_fn(logits, batch) -> scalar
    loss_fn.stats                                                         # the last call's statistics

The batch is a dict of (B, T) tensors, or with ``train_batch(..., packed=True)`` one (B, T, 5) tensor, which
pipeline schedules split into microbatches and context parallelism shards along T like any target.

Log-probs are ``log_softmax(logits / temperature)`` at the target token (``token_logprobs``; generation
reports the same quantity, see ``plait.rl.generate``). Notation per valid token: pi the current policy
(differentiable), mu the behaviour policy that sampled it, pi_prox the proximal policy (the trainer's
weights before this step, computed with ``sequence_logprobs`` under no_grad), A the advantage.

  tis            -sg(min(pi/mu, rho)) * A * log pi. The weight is a constant: the gradient is the
                 truncated-IS policy gradient (LlamaRL's AIPO, OpenRLHF/verl TIS). ``rho=None``: untruncated.
  decoupled_ppo  -w * min(r * A, clip(r, 1 - eps, 1 + eps_high) * A), w = pi_prox / mu (a constant),
                 r = pi / pi_prox (AReaL). ``rho`` truncates w at rho, or with ``drop_above_rho`` zeroes
                 tokens whose w exceeds rho (AReaL's behaviour-weight cap); None leaves w as it is.

Normalisation (``normalize``): "token" (default) sums over valid tokens and divides by their number in
the batch (long completions weigh more, DAPO-style); "sequence" averages each sequence's tokens, then the
sequences (GRPO's original). ``denominator`` replaces the count (tokens or sequences) by a constant of the
caller's: with data parallelism the train step averages over ranks, so pass the global count / dp for an
exact global token mean, or e.g. batch * max_len (Dr. GRPO); pipeline microbatches and cp shards need such a
fixed denominator too (each would otherwise divide by its own count). ``mask`` may be float: it weights tokens.
Masked positions never reach the loss or the statistics, whatever their log-probs hold.

Statistics (0-d tensors, detached, over valid tokens; no host sync): ``is_weight`` the mean untruncated IS
weight (pi/mu for tis, pi_prox/mu for decoupled_ppo), ``truncated_frac`` the share above rho,
``clip_frac`` the share where PPO's clipped branch is taken (0 for tis), ``behaviour_kl`` the mean of
log mu - log pi (a k1 estimate of KL(mu || pi): how far the trainer has moved from the sampler).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

LOSSES = ("tis", "decoupled_ppo")
NORMALIZE = ("token", "sequence")
PACKED_FIELDS = ("targets", "mask", "behaviour_logprobs", "proximal_logprobs", "advantages")


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """(..., V) logits, (...) targets -> (...) log-probs of the targets under softmax(logits / temperature),
    computed in float32 at least (bf16/fp16 logits are upcast)."""
    if temperature <= 0:
        raise ValueError(f"temperature={temperature}: log-probs need temperature > 0 (greedy rollouts report "
                         "temperature 1)")
    x = logits.float() if logits.dtype in (torch.bfloat16, torch.float16) else logits
    x = x / temperature if temperature != 1.0 else x
    return x.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - x.logsumexp(-1)


def group_advantages(rewards: torch.Tensor, group_size: int | None = None, groups: torch.Tensor | None = None,
                     *, scale: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """GRPO advantages: (r - mean of its group) / (std of its group + eps); ``scale=False`` skips the division
    (Dr. GRPO). Groups are consecutive blocks of ``group_size`` or given as ids (``groups``, (N,) long).
    The std is the sample std (n - 1, as TRL and verl); a group of one gets advantage 0."""
    rewards = rewards.flatten()
    if (group_size is None) == (groups is None):
        raise ValueError("give exactly one of group_size (consecutive blocks) or groups (an id per reward)")
    if groups is None:
        if group_size < 1 or rewards.numel() % group_size:
            raise ValueError(f"{rewards.numel()} rewards do not split into groups of group_size={group_size}")
        groups = torch.arange(rewards.numel(), device=rewards.device) // group_size
    if groups.shape != rewards.shape:
        raise ValueError(f"groups {tuple(groups.shape)} must give one id per reward {tuple(rewards.shape)}")
    dtype = torch.promote_types(rewards.dtype, torch.float32)
    rewards = rewards.to(dtype)
    _, index = torch.unique(groups, return_inverse=True)
    count = torch.bincount(index).to(dtype)
    mean = torch.zeros_like(count).index_add_(0, index, rewards) / count
    centred = rewards - mean[index]
    if not scale:
        return centred
    var = torch.zeros_like(count).index_add_(0, index, centred.square()) / (count - 1).clamp(min=1)
    return centred / (var.sqrt()[index] + eps)


def tis_loss(logprobs: torch.Tensor, behaviour_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
             *, rho: float | None = 2.0, normalize: str = "token", denominator: float | None = None
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Truncated importance-weighted policy gradient; all (B, T) but ``advantages`` ((B,) or (B, T))."""
    valid, adv = _check(logprobs, behaviour_logprobs, advantages, mask)
    log_ratio = torch.where(valid, logprobs.detach() - behaviour_logprobs.detach(), 0.0)  # sg: the whole weight
    ratio = log_ratio.exp()
    weight = ratio if rho is None else ratio.clamp(max=rho)
    loss = _reduce(-weight * adv * logprobs, mask, normalize, denominator)
    stats = _stats(valid, ratio, rho, torch.zeros_like(valid), log_ratio)
    return loss, stats


def decoupled_ppo_loss(logprobs: torch.Tensor, behaviour_logprobs: torch.Tensor, proximal_logprobs: torch.Tensor,
                       advantages: torch.Tensor, mask: torch.Tensor, *, clip_eps: float = 0.2,
                       clip_eps_high: float | None = None, rho: float | None = None, drop_above_rho: bool = False,
                       normalize: str = "token", denominator: float | None = None
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """AReaL's decoupled PPO objective; all (B, T) but ``advantages`` ((B,) or (B, T))."""
    valid, adv = _check(logprobs, behaviour_logprobs, advantages, mask)
    if proximal_logprobs.shape != logprobs.shape:
        raise ValueError(f"proximal_logprobs {tuple(proximal_logprobs.shape)} must match logprobs "
                         f"{tuple(logprobs.shape)}")
    w_raw = torch.where(valid, proximal_logprobs.detach() - behaviour_logprobs.detach(), 0.0).exp()
    if rho is None:
        w = w_raw
    else:
        w = torch.where(w_raw > rho, 0.0, w_raw) if drop_above_rho else w_raw.clamp(max=rho)
    ratio = torch.where(valid, logprobs - proximal_logprobs.detach(), 0.0).exp()
    high = clip_eps if clip_eps_high is None else clip_eps_high
    unclipped, clipped = ratio * adv, ratio.clamp(1.0 - clip_eps, 1.0 + high) * adv
    loss = _reduce(-w * torch.minimum(unclipped, clipped), mask, normalize, denominator)
    log_ratio = torch.where(valid, logprobs.detach() - behaviour_logprobs.detach(), 0.0)
    return loss, _stats(valid, w_raw, rho, clipped.detach() < unclipped.detach(), log_ratio)


@dataclass
class PolicyLoss:
    """``loss_fn(logits, batch) -> scalar`` for ``parallelize``'s train step, the loss selected by ``name``.

    ``batch`` (from ``train_batch``): targets, mask, behaviour_logprobs, advantages and, for
    decoupled_ppo, proximal_logprobs. ``options`` go to the loss function (rho, clip_eps, normalize, ...).
    ``batch`` may also be ``train_batch(..., packed=True)``'s single tensor (for pipeline or context
    parallelism). The statistics of the last call are kept in ``stats`` (under pipeline parallelism: the
    last microbatch's)."""

    name: str = "tis"
    temperature: float = 1.0
    options: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.name not in LOSSES:
            raise ValueError(f"unknown policy loss {self.name!r}: choose one of {LOSSES}")

    def __call__(self, logits: torch.Tensor, batch: dict | torch.Tensor) -> torch.Tensor:
        if isinstance(batch, torch.Tensor):
            batch = unpack_batch(batch)
        logprobs = token_logprobs(logits, batch["targets"], self.temperature)
        args = (logprobs, batch["behaviour_logprobs"])
        options = dict(self.options)
        beta = options.pop("kl_beta", 0.0)
        if self.name == "decoupled_ppo":
            prox = batch.get("proximal_logprobs")
            if prox is None or bool(torch.isnan(prox).any()):  # a packed batch marks it missing with NaN
                raise ValueError("decoupled_ppo needs batch['proximal_logprobs']: compute them with "
                                 "sequence_logprobs(model, tokens, mask) under no_grad before the step")
            args += (batch["proximal_logprobs"],)
            loss, self.stats = decoupled_ppo_loss(*args, batch["advantages"], batch["mask"], **options)
        else:
            loss, self.stats = tis_loss(*args, batch["advantages"], batch["mask"], **options)
        if beta:
            if "ref_logprobs" not in batch:
                raise ValueError("train.kl_beta > 0 needs batch['ref_logprobs']: the reference model's log-probs")
            penalty = k3_kl(logprobs, batch["ref_logprobs"], batch["mask"], options.get("normalize", "token"),
                            options.get("denominator"))
            loss = loss + beta * penalty
            self.stats = {**self.stats, "kl_ref": penalty.detach()}
        return loss


def train_batch(tokens: torch.Tensor, mask: torch.Tensor, behaviour_logprobs: torch.Tensor,
                advantages: torch.Tensor, proximal_logprobs: torch.Tensor | None = None, *, packed: bool = False
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | torch.Tensor]:
    """Right-padded sequences (B, S) (``plait.rl.generate.pack_sequences``) -> (inputs (B, S-1), batch): the
    model reads ``tokens[:, :-1]``, and position t of every batch tensor is about token t + 1.

    ``packed=True`` gives the batch as ONE (B, S-1, 5) tensor of ``PACKED_FIELDS`` (in the log-probs' float
    dtype; token ids are exact below 2**24 in float32): pipeline schedules split it into microbatches and
    context parallelism shards its sequence dim like any target tensor, which a dict does not get. A
    missing ``proximal_logprobs`` column is NaN (decoupled_ppo refuses it)."""
    if advantages.ndim not in (1, 2) or advantages.shape[0] != tokens.shape[0]:
        raise ValueError(f"advantages {tuple(advantages.shape)} must be (batch,) or (batch, seq) for tokens "
                         f"{tuple(tokens.shape)}")
    batch = {"targets": tokens[:, 1:], "mask": mask[:, 1:], "behaviour_logprobs": behaviour_logprobs[:, 1:],
             "advantages": advantages if advantages.ndim == 1 else advantages[:, 1:]}
    if proximal_logprobs is not None:
        batch["proximal_logprobs"] = proximal_logprobs[:, 1:]
    if not packed:
        return tokens[:, :-1], batch
    dtype = behaviour_logprobs.dtype
    columns = {k: batch.get(k, torch.full_like(batch["behaviour_logprobs"], float("nan"))) for k in PACKED_FIELDS}
    columns["advantages"] = columns["advantages"].to(dtype).reshape(tokens.shape[0], -1).expand_as(batch["mask"])
    return tokens[:, :-1], torch.stack([columns[k].to(dtype) for k in PACKED_FIELDS], -1)


def unpack_batch(packed: torch.Tensor) -> dict[str, torch.Tensor]:
    """The dict ``train_batch`` would give from its ``packed=True`` tensor (B, T, 5)."""
    if packed.ndim != 3 or packed.shape[-1] != len(PACKED_FIELDS):
        raise ValueError(f"a packed RL batch is (batch, seq, {len(PACKED_FIELDS)}), got {tuple(packed.shape)}")
    batch = dict(zip(PACKED_FIELDS, packed.unbind(-1), strict=True))
    batch["targets"] = batch["targets"].long()
    return batch


def _check(logprobs, behaviour_logprobs, advantages, mask) -> tuple[torch.Tensor, torch.Tensor]:
    """(valid-token bool mask, advantages broadcast to (B, T))."""
    if logprobs.ndim != 2 or behaviour_logprobs.shape != logprobs.shape or mask.shape != logprobs.shape:
        raise ValueError(f"logprobs {tuple(logprobs.shape)}, behaviour_logprobs {tuple(behaviour_logprobs.shape)} "
                         f"and mask {tuple(mask.shape)} must all be the same (batch, seq)")
    if advantages.ndim == 1 and advantages.shape[0] == logprobs.shape[0]:
        advantages = advantages[:, None]
    elif advantages.shape != logprobs.shape:
        raise ValueError(f"advantages {tuple(advantages.shape)} must be (batch,) or (batch, seq) for logprobs "
                         f"{tuple(logprobs.shape)}")
    return mask > 0, advantages.to(logprobs.dtype).expand_as(logprobs)


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, normalize: str = "token",
          denominator: float | None = None) -> torch.Tensor:
    """GRPO's KL penalty to a reference policy, the k3 estimator per token (Schulman): exp(ref - pi) - (ref - pi) - 1,
    non-negative and unbiased for KL(pi || ref) under samples of pi; reduced like the policy loss."""
    diff = torch.where(mask > 0, ref_logprobs.detach() - logprobs, 0.0)
    return _reduce(diff.exp() - diff - 1.0, mask, normalize, denominator)


def _reduce(per_token: torch.Tensor, mask: torch.Tensor, normalize: str, denominator: float | None) -> torch.Tensor:
    weights = mask.to(per_token.dtype)
    per_token = torch.where(mask > 0, per_token, 0.0) * weights  # NaN/inf at masked positions cannot leak in
    if normalize == "token":
        count = weights.sum().clamp(min=1.0) if denominator is None else denominator
        return per_token.sum() / count
    if normalize == "sequence":
        per_seq = per_token.sum(-1) / weights.sum(-1).clamp(min=1e-12)
        count = (weights.sum(-1) > 0).sum().clamp(min=1) if denominator is None else denominator
        return per_seq.sum() / count
    raise ValueError(f"normalize={normalize!r}: choose one of {NORMALIZE}")


def _stats(valid: torch.Tensor, weight: torch.Tensor, rho: float | None, clipped: torch.Tensor,
           log_ratio: torch.Tensor) -> dict[str, torch.Tensor]:
    n = valid.sum().clamp(min=1)

    def mean(x: torch.Tensor) -> torch.Tensor:
        return torch.where(valid, x.to(weight.dtype), 0.0).sum().detach() / n

    over = weight > rho if rho is not None else torch.zeros_like(valid)
    return {"is_weight": mean(weight), "truncated_frac": mean(over), "clip_frac": mean(clipped),
            "behaviour_kl": mean(-log_ratio), "tokens": valid.sum().detach()}
