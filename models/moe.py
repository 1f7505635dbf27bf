"""Mixture-of-experts pieces: Plait's experts module and router, the balance losses, the expert-load meter.

    moe = MoE(d_model=64, n_experts=8, top_k=2, expert_hidden=96, n_shared=1)   # GPT-MoE's feed-forward
    y = moe(x)                       # (B, S, H) -> (B, S, H); moe.aux: this call's weighted aux term
    meter = ExpertLoad.attach(model, spec)   # per-expert token counts from every router (spec.routers)
    meter.take() -> {"expert_max_share": ..., "counts": [[...] per layer]}

The experts module keeps transformers 5.23's interface (MixtralExperts / Qwen3MoeExperts), the contract expert
parallelism relies on: ``forward(hidden (T, H), top_k_index (T, k) int64, top_k_weights (T, k)) -> (T, H)`` is
sum_k w_k * expert_{idx_k}(x), ``num_experts``, parameters with the expert on dim 0 (``gate_up_proj (E, 2I, H)``,
``down_proj (E, H, I)``, SwiGLU). Dropless: every token's k experts are computed (no capacity). Shared experts
(DeepSeek) are a dense SwiGLU MLP beside the routed ones, not in the experts module.

Routers (``ROUTERS``): ``topk_softmax`` (Mixtral: top-k of the logits, softmax over the k chosen = softmax, top-k,
renormalised), ``softmax_topk`` (DeepSeek-V2 / Qwen3-MoE without ``norm_topk_prob``: softmax over all experts,
the top-k probabilities used as they are). Either returns ``(logits, weights, indices)`` as HF's routers do.

GPT-MoE's auxiliary term, per MoE layer, averaged over layers (so the coefficients do not scale with depth):
  balance  DeepSeek / Switch form: E/(k T) * sum_e count_e * P_e (count_e: tokens that chose expert e among
           their k, P_e: mean router probability of e); 1 when balanced
  z-loss   ST-MoE: mean over tokens of logsumexp(logits)^2 (keeps router logits small)
  aux = aux_loss_coef * balance + z_loss_coef * z

Under tensor parallelism a MoE block is replicated (``moe_block_style``): its input is the full activation as a
plain tensor (gathered from Shard(1) under sequence parallelism, the output sliced back), every tp rank routes
and computes every token alike, its parameters stay plain tensors; expert parallelism (``ep``) splits experts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import PrepareModuleInput, PrepareModuleInputOutput

ROUTERS = ("topk_softmax", "softmax_topk")


class Experts(nn.Module):
    """E SwiGLU experts stored as 3-D tensors (HF 5.23's MixtralExperts interface; see the module docstring)."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int):
        super().__init__()
        self.num_experts = num_experts
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, intermediate))

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
                ) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        flat = top_k_index.reshape(-1)
        order = torch.argsort(flat, stable=True)  # (token, slot) pairs grouped by expert
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        token = order // top_k_index.shape[1]
        weight = top_k_weights.reshape(-1)[order]
        start = 0
        for e, n in enumerate(counts[:self.num_experts]):  # ids >= num_experts (not local) are skipped
            if n:
                idx = token[start:start + n]
                gate, up = F.linear(hidden_states[idx], self.gate_up_proj[e]).chunk(2, dim=-1)
                y = F.linear(F.silu(gate) * up, self.down_proj[e]) * weight[start:start + n, None].to(out.dtype)
                out.index_add_(0, idx, y.to(out.dtype))
            start += n
        return out


class Router(nn.Module):
    def __init__(self, hidden: int, num_experts: int, top_k: int, kind: str = "topk_softmax"):
        super().__init__()
        self.top_k, self.num_experts, self.kind = top_k, num_experts, kind
        self.weight = nn.Parameter(torch.empty(num_experts, hidden))

    def forward(self, hidden_states: torch.Tensor):
        logits = F.linear(hidden_states, self.weight)  # (T, E)
        probs = torch.softmax(logits.float() if logits.dtype != torch.float64 else logits, dim=-1)
        top, index = torch.topk(probs, self.top_k, dim=-1)
        if self.kind == "topk_softmax":
            top = top / top.sum(dim=-1, keepdim=True)
        return logits, top.to(hidden_states.dtype), index


def balance_loss(logits: torch.Tensor, index: torch.Tensor, num_experts: int) -> torch.Tensor:
    """E/(k T) * sum_e count_e * P_e (1 when every expert gets T k / E tokens and mean probability 1/E)."""
    probs = torch.softmax(logits.float() if logits.dtype != torch.float64 else logits, dim=-1)
    t, k = index.shape
    counts = torch.bincount(index.reshape(-1), minlength=num_experts).to(probs.dtype)
    return num_experts / (k * t) * (counts * probs.mean(dim=0)).sum()


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE's router z-loss: mean over tokens of logsumexp(logits)^2."""
    return torch.logsumexp(logits.float() if logits.dtype != torch.float64 else logits, dim=-1).square().mean()


class SwiGLU(nn.Module):
    """The dense feed-forward ``w2(silu(w1 x) * w3 x)``: the GPT's (models/gpt.py) and its shared experts'."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(d_model, hidden, bias=False)
        self.w2 = nn.Linear(hidden, d_model, bias=False)
        self.w3 = nn.Linear(d_model, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MoE(nn.Module):
    """Routed experts (+ shared experts) in place of a dense feed-forward; ``aux`` holds the last forward's
    weighted auxiliary term (the GPT sums its layers' into its output, see models/gpt.py)."""

    def __init__(self, d_model: int, n_experts: int, top_k: int, expert_hidden: int, n_shared: int = 0,
                 router: str = "topk_softmax", aux_loss_coef: float = 0.01, z_loss_coef: float = 0.001):
        super().__init__()
        self.router = Router(d_model, n_experts, top_k, router)
        self.experts = Experts(n_experts, d_model, expert_hidden)
        self.shared = SwiGLU(d_model, n_shared * expert_hidden) if n_shared else None
        self.aux_loss_coef, self.z_loss_coef = aux_loss_coef, z_loss_coef
        self.aux: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        logits, weights, index = self.router(flat)
        out = self.experts(flat, index, weights)
        if self.shared is not None:
            out = out + self.shared(flat)
        self.aux = (self.aux_loss_coef * balance_loss(logits, index, self.router.num_experts)
                    + self.z_loss_coef * z_loss(logits))
        return out.reshape(shape)


def moe_block_style(sequence_parallel: bool):
    """The MoE block replicated over tp: plain full input (gathered under SP), output back to the residual's layout."""
    if not sequence_parallel:
        return PrepareModuleInput(input_layouts=(Replicate(),), desired_input_layouts=(Replicate(),),
                                  use_local_output=True)
    return PrepareModuleInputOutput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),),
                                    use_local_input=True, output_layouts=(Replicate(),),
                                    desired_output_layouts=(Shard(1),), use_local_output=True)


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1  # activation checkpointing recomputes forwards there


@dataclass
class ExpertLoad:
    """Per-expert token counts of every router (forward hooks on ``spec.routers`` modules: output index 2 holds
    the (T, k) expert ids, as HF's routers and ``Router`` return), and the auxiliary terms the model's outputs
    carry; ``take()`` reads and resets them. Forwards recomputed in backward (activation checkpointing) and
    forwards without gradients (evaluation) are not counted."""

    counts: dict[str, torch.Tensor] = field(default_factory=dict)
    aux: list[torch.Tensor] = field(default_factory=list)
    handles: list = field(default_factory=list)

    @classmethod
    def attach(cls, model: nn.Module, spec) -> ExpertLoad | None:
        """A meter on ``model``'s routers (None when the family names none or the model has none)."""
        from plait.parallel.loss import aux_loss_of
        from plait.parallel.names import clean_fqn

        routers = tuple(getattr(spec, "routers", ()) or ())
        meter = cls()
        for name, module in model.named_modules():
            name = clean_fqn(name)
            if routers and any(name.endswith(f".{r}") and ".layers." in f".{name}" for r in routers):
                meter.handles.append(module.register_forward_hook(meter._count(name)))
        if not meter.handles:
            return None

        def record_aux(_m, _args, output):
            aux = aux_loss_of(output)
            if aux is not None and torch.is_grad_enabled() and not _in_backward():
                meter.aux.append(aux.detach())  # read in take(): no host sync per forward

        meter.handles.append(model.register_forward_hook(record_aux))
        return meter

    def _count(self, name: str):
        def hook(module, _args, output):
            if not torch.is_grad_enabled() or _in_backward():
                return
            index = output[2].detach()
            n = getattr(module, "num_experts", None) or int(index.max()) + 1
            add = torch.bincount(index.reshape(-1), minlength=n)  # on the device: no sync per layer
            self.counts[name] = self.counts[name] + add if name in self.counts else add
        return hook

    def take(self, group=None) -> dict:
        """{"expert_max_share": max over layers of (max expert count / mean count), "moe_aux_loss": mean aux term,
        "counts": per-layer lists}; counts summed over ``group`` (a process group: the data-parallel ranks)
        when given; then reset."""
        import torch.distributed as dist

        names = sorted(self.counts)
        out: dict = {}
        if names:
            table = torch.stack([self.counts[n].double() for n in names])
            if group is not None and dist.is_initialized():
                dist.all_reduce(table, group=group)
            table = table.cpu()
            share = table.max(dim=1).values / table.mean(dim=1).clamp_min(1e-12)
            out = {"expert_max_share": float(share.max()), "counts": table.long().tolist()}
        if self.aux:
            out["moe_aux_loss"] = float(torch.stack(self.aux).double().mean())
        self.counts, self.aux = {}, []
        return out

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
