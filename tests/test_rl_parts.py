"""RL building blocks without the runtime: tokenizer, verifiable-reward tasks, KV-cache generation, losses.

Generation checks run a tiny GPT in float64, so cached decoding with left padding must reproduce a plain
per-row recomputation of the whole sequence to rounding; the loss checks compare against numbers worked
out by hand on a fixed 2 x 3 batch (written out below).
"""

import ast
import inspect
import math
import random

import plait.rl.tasks as tasks_module
import pytest
import torch
from plait.models.gpt import GPT, GPTConfig
from plait.rl.generate import generate, pack_sequences, sample_next, sequence_logprobs
from plait.rl.losses import PolicyLoss, decoupled_ppo_loss, group_advantages, tis_loss, train_batch, unpack_batch
from plait.rl.tasks import Task, evaluate_countdown, make_tasks, reward
from plait.rl.tokenizer import CHARACTERS, CharTokenizer, left_pad

TOK = CharTokenizer()
CFG = GPTConfig(vocab_size=TOK.vocab_size, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64)


@pytest.fixture(scope="module")
def model64():
    torch.manual_seed(0)
    return GPT(CFG).double()


@pytest.fixture(scope="module")
def prompts():
    """Prompts of different lengths (4 to 10 tokens with bos), so most rows are left-padded."""
    tasks = make_tasks("addition", 4, seed=0, digits=3) + make_tasks("reversal", 2, seed=0) + \
        make_tasks("digit_sum", 2, seed=0)
    return left_pad([TOK.encode(t.prompt, bos=True) for t in tasks], TOK.pad_id)


# ---------------------------------------------------------------- tokenizer

def test_tokenizer_round_trips_every_character_and_decoding_stops_at_eos():
    ids = TOK.encode(CHARACTERS, bos=True, eos=True)
    assert ids[0] == TOK.bos_id and ids[-1] == TOK.eos_id and max(ids) == TOK.vocab_size - 1
    assert TOK.decode(ids) == CHARACTERS
    assert TOK.decode(TOK.encode("3+4=") + [TOK.eos_id] + TOK.encode("99")) == "3+4="
    assert TOK.decode(torch.tensor([TOK.pad_id, *TOK.encode("ab"), TOK.eos_id, *TOK.encode("c")]),
                      stop_at_eos=False) == "abc"


def test_tokenizer_errors_name_the_unknown_character_and_id():
    with pytest.raises(ValueError, match=r"character 'A' at position 2 of 'abAc'"):
        TOK.encode("abAc")
    with pytest.raises(ValueError, match=r"id 999 at position 1"):
        TOK.decode([3, 999])


def test_left_pad_aligns_last_tokens_and_gives_mask_and_positions():
    batch = left_pad([[5, 6, 7], [8]], TOK.pad_id)
    assert batch.tokens.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch.mask.tolist() == [[True, True, True], [False, False, True]]
    assert batch.positions.tolist() == [[0, 1, 2], [0, 0, 0]] and batch.lengths.tolist() == [3, 1]
    with pytest.raises(ValueError, match=r"sequences \[1\] are empty"):
        left_pad([[5], []], TOK.pad_id)


# ---------------------------------------------------------------- tasks

def test_tasks_are_deterministic_under_a_seed_and_a_prefix_of_longer_runs():
    for name in ("digit_sum", "addition", "reversal", "countdown"):
        assert make_tasks(name, 20, seed=3) == make_tasks(name, 50, seed=3)[:20]
        assert make_tasks(name, 20, seed=3) != make_tasks(name, 20, seed=4)
        assert all(reward(t, t.answer) == 1.0 for t in make_tasks(name, 200, seed=1))
        assert all(TOK.decode(TOK.encode(t.prompt + t.answer)) == t.prompt + t.answer for t in make_tasks(name, 50))
    with pytest.raises(ValueError, match=r"no option \['digit'\]: its options are \['digits'\]"):
        make_tasks("addition", 1, digit=3)
    with pytest.raises(ValueError, match="unknown task 'sums'"):
        make_tasks("sums", 1)


def test_rewards_for_correct_incorrect_and_malformed_answers():
    digit = Task("digit_sum", "3+4=", "7")
    assert reward(digit, "7") == 1.0 and reward(digit, " 7 ") == 1.0
    assert reward(digit, "8") == 0.0 and reward(digit, "77") == 0.0 and reward(digit, "") == 0.0
    assert reward(digit, "8", format_reward=0.1) == 0.1 and reward(digit, "7a", format_reward=0.1) == 0.0
    rev = Task("reversal", "rev abc=", "cba")
    assert reward(rev, "cba") == 1.0 and reward(rev, "abc") == 0.0 and reward(rev, "cb a", format_reward=0.1) == 0.0
    count = Task("countdown", "3 5 7:22=", "(3*5)+7", {"numbers": [3, 5, 7], "target": 22})
    assert reward(count, "7+3*5") == 1.0 and reward(count, "(7 + (5*3))") == 1.0  # any solution counts
    assert reward(count, "3+5+7") == 0.0 and reward(count, "3+5+7", format_reward=0.1) == 0.1
    assert reward(count, "22") == 0.0 and reward(count, "3*5+7+") == 0.0
    # the completion text ends at eos: what follows it is never scored
    assert reward(digit, TOK.decode(TOK.encode("7") + [TOK.eos_id] + TOK.encode("123"))) == 1.0


def test_countdown_parser_refuses_reuse_unknown_numbers_and_other_tokens():
    assert evaluate_countdown("(10-4)*4", [10, 4, 4]) == 24
    refused = {
        "2*2": "used more often", "4*4*4": "used more often", "3+3": "not among", "11-1": "not among", "2**3": "'\\*'",
        "10/2": "'/'", "-4+10": "'-'", "(4+10": "without a matching", "4+": "ends where", "04+10": "leading zero",
        "4 10": "unexpected", "__import__('os')": "'_'", "()": "'\\)'", "1e3": "'e'",
    }
    for expression, why in refused.items():
        with pytest.raises(ValueError, match=why):
            evaluate_countdown(expression, [10, 4, 4, 2])
    with pytest.raises(ValueError, match="longer than"):
        evaluate_countdown("(" * 200 + "4" + ")" * 200, [4])


def test_rewards_are_computed_without_eval_or_exec():
    tree = ast.parse(inspect.getsource(tasks_module))
    called = {node.func.id for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)}
    assert not called & {"eval", "exec", "compile", "__import__"}


def test_a_random_digit_policy_scores_about_ten_percent_on_digit_sums():
    rng = random.Random(0)
    tasks = make_tasks("digit_sum", 4000, seed=0)
    score = sum(reward(t, str(rng.randint(0, 9))) for t in tasks) / len(tasks)
    assert 0.085 < score < 0.115


# ---------------------------------------------------------------- generation

def recompute_without_cache(model, batch, completion, temperature, top_p, seed):
    """The reference: each row's unpadded prompt + completion through one plain forward (no cache, no
    padding); the logits that predict each completion token, all rows at a step, go through the same sampler
    and generator. Since a position's logits depend only on the tokens before it, this equals recomputing
    the whole sequence at every step whenever the replayed tokens equal the completion's."""
    gen = torch.Generator().manual_seed(seed)
    steps = completion.shape[1]
    logits = []
    for row in range(len(batch.tokens)):
        prompt = batch.tokens[row][batch.mask[row]]
        full = torch.cat([prompt, completion[row]])[None]
        logits.append(model(full)[0, len(prompt) - 1:len(prompt) - 1 + steps])
    logits = torch.stack(logits)  # (B, steps, V)
    tokens, logprobs = zip(*(sample_next(logits[:, t], temperature, top_p, gen) for t in range(steps)), strict=True)
    return torch.stack(tokens, 1), torch.stack(logprobs, 1)


@pytest.mark.parametrize("temperature,top_p", [(0.0, 1.0), (1.0, 1.0), (0.7, 0.9)])
def test_cached_generation_equals_full_recompute_without_cache(model64, prompts, temperature, top_p):
    out = generate(model64, prompts.tokens, 10, temperature=temperature, top_p=top_p,
                   generator=torch.Generator().manual_seed(5), pad_id=TOK.pad_id, weight_version=3)
    tokens, logprobs = recompute_without_cache(model64, prompts, out.tokens, temperature, top_p, seed=5)
    assert out.tokens.shape == (8, 10) and out.mask.all() and out.weight_version == 3
    assert torch.equal(out.tokens, tokens)
    assert (out.logprobs - logprobs).abs().max() < 1e-10
    assert "attend" not in model64.layers["0"].attention.__dict__  # the padding-aware attention was put back


def test_trainer_sequence_logprobs_match_behaviour_logprobs_float32(prompts):
    torch.manual_seed(1)
    model = GPT(CFG)
    out = generate(model, prompts.tokens, 12, temperature=0.8, stop_token=TOK.eos_id,
                   generator=torch.Generator().manual_seed(0), pad_id=TOK.pad_id)
    seqs = pack_sequences(prompts.tokens, out, pad_id=TOK.pad_id)
    with torch.no_grad():
        trainer = sequence_logprobs(model, seqs.tokens, seqs.mask, temperature=0.8)
    assert seqs.mask.sum() == out.mask.sum() and (trainer[~seqs.mask] == 0).all()
    assert (trainer - seqs.behaviour_logprobs).abs().max() < 1e-5
    # rows start at position 0: a row's prompt is followed directly by its completion, padding at the end
    assert seqs.tokens[0, 0] == TOK.bos_id and seqs.tokens[:, 0].eq(TOK.bos_id).all()


def test_stop_token_ends_a_row_and_later_positions_are_masked(model64, prompts):
    first = generate(model64, prompts.tokens, 6, temperature=0.0, pad_id=TOK.pad_id)
    stop = int(first.tokens[0, 2])  # the greedy third token of row 0: row 0 stops there
    out = generate(model64, prompts.tokens, 6, temperature=0.0, stop_token=stop, pad_id=TOK.pad_id)
    for row in range(len(out.tokens)):
        hits = (first.tokens[row] == stop).nonzero().flatten().tolist()
        length = hits[0] + 1 if hits else 6
        assert out.lengths[row] == length and bool(out.finished[row]) == bool(hits)
        assert out.tokens[row, length:].eq(TOK.pad_id).all() and not out.mask[row, length:].any()
        assert torch.equal(out.tokens[row, :length], first.tokens[row, :length])
    assert out.lengths[0] == 3 and out.finished[0]


def test_tiny_top_p_samples_the_most_probable_token_and_logprobs_stay_full_softmax(model64, prompts):
    greedy = generate(model64, prompts.tokens, 5, temperature=0.0, pad_id=TOK.pad_id)
    nucleus = generate(model64, prompts.tokens, 5, temperature=1.0, top_p=1e-6, pad_id=TOK.pad_id,
                       generator=torch.Generator().manual_seed(0))
    assert torch.equal(nucleus.tokens, greedy.tokens)
    assert (nucleus.logprobs - greedy.logprobs).abs().max() < 1e-12 and (nucleus.logprobs < 0).all()


def test_a_seeded_generator_reproduces_a_rollout_and_interrupts_return_what_was_made(model64, prompts):
    def run(**kw):
        return generate(model64, prompts.tokens, 8, generator=torch.Generator().manual_seed(7), pad_id=TOK.pad_id,
                        **kw)

    a, b = run(), run()
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.logprobs, b.logprobs)
    polls = []
    cut = run(should_interrupt=lambda: polls.append(1) or len(polls) >= 3)
    assert cut.interrupted and cut.tokens.shape == (8, 3) and torch.equal(cut.tokens, a.tokens[:, :3])


def test_generate_refuses_right_padding_and_too_long_requests(model64):
    right = torch.tensor([[1, 5, 6], [1, 5, TOK.pad_id]])
    with pytest.raises(ValueError, match="pad prompts on the LEFT"):
        generate(model64, right, 4, pad_id=TOK.pad_id)
    with pytest.raises(ValueError, match="exceeds model.max_seq_len=64"):
        generate(model64, torch.ones(1, 10, dtype=torch.long), 60, pad_id=TOK.pad_id)


# ---------------------------------------------------------------- losses
# A fixed batch of 2 sequences x 3 token positions; the last token of sequence 1 is padding.
PI = torch.tensor([[-1.0, -0.5, -2.0], [-0.2, -1.5, -0.7]], dtype=torch.float64)  # log pi (current)
MU = torch.tensor([[-1.2, -0.5, -1.0], [-0.2, -2.5, 0.0]], dtype=torch.float64)  # log mu (behaviour)
PROX = torch.tensor([[-1.4, -0.6, -1.5], [-0.2, -2.0, -0.5]], dtype=torch.float64)  # log pi_prox
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
ADV = torch.tensor([1.0, -2.0], dtype=torch.float64)


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0])
    # group 0: mean 0.5, sample std sqrt(1/3) -> +-0.5 / 0.57735 = +-0.866025
    # group 1: mean 0.75, sample std 0.5 -> 0.5, 0.5, 0.5, -1.5
    expected = torch.tensor([0.866025, -0.866025, -0.866025, 0.866025, 0.5, 0.5, 0.5, -1.5])
    assert torch.allclose(group_advantages(rewards, group_size=4), expected, atol=1e-5)
    assert torch.allclose(group_advantages(rewards, group_size=4, scale=False),
                          torch.tensor([0.5, -0.5, -0.5, 0.5, 0.25, 0.25, 0.25, -0.75]))
    ids = torch.tensor([7, 7, 7, 7, 2, 2, 2, 2])[torch.tensor([0, 4, 1, 5, 2, 6, 3, 7])]  # interleaved groups
    by_id = group_advantages(rewards[torch.tensor([0, 4, 1, 5, 2, 6, 3, 7])], groups=ids)
    assert torch.allclose(by_id, expected[torch.tensor([0, 4, 1, 5, 2, 6, 3, 7])], atol=1e-5)
    # a constant group and a group of one carry no signal
    assert group_advantages(torch.tensor([1.0, 1.0, 0.3]), groups=torch.tensor([0, 0, 1])).abs().max() == 0
    with pytest.raises(ValueError, match="do not split into groups of group_size=3"):
        group_advantages(rewards, group_size=3)


def test_truncated_importance_weights_and_tis_loss_by_hand():
    # weights pi/mu = exp(pi - mu): row 0: e^0.2 = 1.221403, 1, e^-1 = 0.367879; row 1: 1, e^1 = 2.718282 -> rho 2
    # per token -w * A * log pi: 1.221403, 0.5, 0.735759 | -0.4, -6.0   (A = 1 | -2)
    loss, stats = tis_loss(PI, MU, ADV, MASK, rho=2.0)
    assert abs(loss.item() - (1.221403 + 0.5 + 0.735759 - 0.4 - 6.0) / 5) < 1e-6  # -0.788568
    assert abs(stats["is_weight"].item() - (1.221403 + 1 + 0.367879 + 1 + 2.718282) / 5) < 1e-6
    assert stats["truncated_frac"].item() == pytest.approx(0.2) and stats["clip_frac"].item() == 0
    assert stats["behaviour_kl"].item() == pytest.approx((-0.2 + 0 + 1.0 + 0 - 1.0) / 5)
    seq_loss, _ = tis_loss(PI, MU, ADV, MASK, rho=2.0, normalize="sequence")
    assert abs(seq_loss.item() - ((1.221403 + 0.5 + 0.735759) / 3 + (-0.4 - 6.0) / 2) / 2) < 1e-6  # -1.190473
    fixed, _ = tis_loss(PI, MU, ADV, MASK, rho=2.0, denominator=10.0)
    assert abs(fixed.item() - (1.221403 + 0.5 + 0.735759 - 0.4 - 6.0) / 10) < 1e-6


def test_decoupled_ppo_loss_by_hand():
    # w = pi_prox/mu: e^-0.2 = 0.818731, e^-0.1 = 0.904837, e^-0.5 = 0.606531 | 1, e^0.5 = 1.648721
    # r = pi/pi_prox: e^0.4 = 1.491825, e^0.1 = 1.105171, e^-0.5 = 0.606531 | 1, e^0.5 = 1.648721
    # A = 1: min(r, clip(r, 0.8, 1.2)) = 1.2 (clipped), 1.105171, 0.606531;
    # A = -2: min(-2r, -2 clip(r)) = -2, -3.297443 (unclipped; the clip would give -2.4)
    # per token -w * min: -0.982477, -1.0, -0.367879 | 2.0, 5.436564
    loss, stats = decoupled_ppo_loss(PI, MU, PROX, ADV, MASK, clip_eps=0.2)
    assert abs(loss.item() - (-0.982477 - 1.0 - 0.367879 + 2.0 + 5.436564) / 5) < 1e-6  # 1.017241
    assert stats["clip_frac"].item() == pytest.approx(0.2) and stats["truncated_frac"].item() == 0
    assert abs(stats["is_weight"].item() - (0.818731 + 0.904837 + 0.606531 + 1 + 1.648721) / 5) < 1e-6
    # rho = 1.5 truncates the last weight: -1.5 * -3.297443 = 4.946164; AReaL's cap drops that token instead
    truncated, stats = decoupled_ppo_loss(PI, MU, PROX, ADV, MASK, rho=1.5)
    assert abs(truncated.item() - (-0.982477 - 1.0 - 0.367879 + 2.0 + 4.946164) / 5) < 1e-6
    assert stats["truncated_frac"].item() == pytest.approx(0.2)
    dropped, _ = decoupled_ppo_loss(PI, MU, PROX, ADV, MASK, rho=1.5, drop_above_rho=True)
    assert abs(dropped.item() - (-0.982477 - 1.0 - 0.367879 + 2.0) / 5) < 1e-6


def test_tis_gradient_flows_only_through_log_pi():
    pi = PI.clone().requires_grad_()
    mu = MU.clone().requires_grad_()
    loss, _ = tis_loss(pi, mu, ADV, MASK, rho=2.0)
    loss.backward()
    # d loss / d log pi = -sg(min(pi/mu, rho)) * A / 5 (no term from the weight's own dependence on pi)
    weight = torch.tensor([[math.exp(0.2), 1.0, math.exp(-1.0)], [1.0, 2.0, 0.0]], dtype=torch.float64)
    assert torch.allclose(pi.grad, -weight * ADV[:, None] * MASK / 5)
    assert mu.grad is None or mu.grad.abs().max() == 0


def test_masked_positions_never_reach_the_loss():
    poisoned_mu = MU.clone()
    poisoned_mu[1, 2] = float("-inf")  # padding: pi/mu would be inf there
    for loss, _ in (tis_loss(PI, poisoned_mu, ADV, MASK), decoupled_ppo_loss(PI, poisoned_mu, PROX, ADV, MASK)):
        assert torch.isfinite(loss)
    assert tis_loss(PI, poisoned_mu, ADV, MASK)[0] == tis_loss(PI, MU, ADV, MASK)[0]


def test_policy_loss_fn_on_model_logits_pushes_completions_by_their_advantage(prompts):
    torch.manual_seed(2)
    model = GPT(CFG).double()
    out = generate(model, prompts.tokens, 6, generator=torch.Generator().manual_seed(1), pad_id=TOK.pad_id)
    seqs = pack_sequences(prompts.tokens, out, pad_id=TOK.pad_id)
    advantages = torch.tensor([1.0, -1.0] * 4, dtype=torch.float64)
    with torch.no_grad():
        prox = sequence_logprobs(model, seqs.tokens, seqs.mask)
    inputs, batch = train_batch(seqs.tokens, seqs.mask, seqs.behaviour_logprobs, advantages, prox)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for name in ("tis", "decoupled_ppo"):
        loss_fn = PolicyLoss(name, options={"rho": 2.0})
        loss = loss_fn(model(inputs), batch)  # the shape parallelize's train step calls: loss_fn(output, targets)
        assert loss_fn.stats["is_weight"].item() == pytest.approx(1.0, abs=1e-9)  # same weights: pi == mu
        assert loss_fn.stats["tokens"] == out.mask.sum()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        after = sequence_logprobs(model, seqs.tokens, seqs.mask)
    change = (after - prox).sum(1)
    assert (change[advantages > 0] > 0).all() and (change[advantages < 0] < 0).all()
    with pytest.raises(ValueError, match="decoupled_ppo needs batch\\['proximal_logprobs'\\]"):
        PolicyLoss("decoupled_ppo")(model(inputs), {k: v for k, v in batch.items() if k != "proximal_logprobs"})


def test_the_step_guard_backtracks_a_step_that_moves_the_policy_too_far_and_keeps_a_small_one(prompts):
    from plait.rl.trust_region import StepGuard

    torch.manual_seed(3)
    model = GPT(CFG).double()
    inputs, valid = prompts.tokens[:, :-1], prompts.mask[:, 1:].bool()
    guard = StepGuard(max_kl=0.01, max_backtracks=8)

    def exact_kl(before) -> float:  # by hand: sum_v p_old (log p_old - log p_new), mean over valid positions
        with torch.no_grad():
            new = torch.log_softmax(model(inputs)[valid], -1)
        return float((before.logp.exp() * (before.logp - new)).sum(-1).mean())

    def step(lr: float):
        before = guard.snapshot(model, inputs, valid)
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        (-model(inputs).log_softmax(-1)[..., 7][valid].mean()).backward()  # push every position toward token 7
        optimizer.step()
        moved = [p.detach().clone() - b for p, b in zip(model.parameters(), before.params, strict=True)]
        return before, moved, exact_kl(before)

    before, moved, raw = step(lr=0.5)
    assert raw > 0.1  # the raw step moved the policy well past the bound
    kl, scale = guard.enforce(model, inputs, valid, before)
    assert 0 < scale < 1 and kl <= 0.01 and kl == pytest.approx(exact_kl(before), rel=1e-9)
    for p, b, d in zip(model.parameters(), before.params, moved, strict=True):  # the same direction, scaled back
        assert torch.allclose(p.detach() - b, scale * d, atol=1e-12)
    before, _, raw = step(lr=1e-5)
    assert raw <= 0.01 and guard.enforce(model, inputs, valid, before)[1] == 1.0  # a small step is kept as it is
    before, _, _ = step(lr=0.5)
    # the line search fails: the step is undone
    assert StepGuard(max_kl=1e-12, max_backtracks=2).enforce(model, inputs, valid, before) == (0.0, 0.0)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before.params, strict=True))
    with pytest.raises(ValueError, match="max_step_kl=-1"):
        StepGuard(max_kl=-1)


def test_a_packed_batch_gives_the_same_loss_and_splits_into_microbatches():
    torch.manual_seed(3)
    tokens = torch.randint(3, TOK.vocab_size, (4, 7))
    mask = torch.zeros(4, 7, dtype=torch.bool)
    mask[:, 3:] = True
    mask[1, 6] = False  # a shorter completion
    behaviour = -torch.rand(4, 7, dtype=torch.float64)
    adv = torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=torch.float64)
    logits = torch.randn(4, 6, TOK.vocab_size, dtype=torch.float64)
    inputs, batch = train_batch(tokens, mask, behaviour, adv, behaviour - 0.1)
    _, packed = train_batch(tokens, mask, behaviour, adv, behaviour - 0.1, packed=True)
    assert packed.shape == (4, 6, 5) and torch.equal(unpack_batch(packed)["targets"], batch["targets"])
    for name in ("tis", "decoupled_ppo"):
        loss_fn = PolicyLoss(name)
        assert loss_fn(logits, packed) == loss_fn(logits, batch)
        # two microbatches, each divided by a fixed half of the token count, average to the whole batch's loss
        halves = PolicyLoss(name, options={"denominator": float(batch["mask"].sum()) / 2})
        split = (halves(logits[:2], packed[:2]) + halves(logits[2:], packed[2:])) / 2
        assert torch.allclose(split, loss_fn(logits, batch))
    _, no_prox = train_batch(tokens, mask, behaviour, adv, packed=True)
    with pytest.raises(ValueError, match="needs batch\\['proximal_logprobs'\\]"):
        PolicyLoss("decoupled_ppo")(logits, no_prox)


# ---------------------------------------------------------------- plot

def test_plot_of_an_rl_run_draws_reward_against_wall_time_first(tmp_path):
    import json

    from plait.runtime.plot import draw, panels, plot_run

    records = [{"step": s, "time": 1e9 + s, "reward": 0.1 * s, "wall_s": 0.5 * s, "loss": 1.0} for s in (1, 2, 3)]
    assert panels(records)[0] == "reward_vs_wall_s"
    assert "reward_vs_wall_s" not in panels([{"step": 1, "reward": 0.1}])  # no wall time logged: no panel
    panel = draw(records).axes[0]
    assert panel.get_title() == "reward against wall time" and panel.get_xlabel() == "wall-clock s"
    assert list(panel.lines[0].get_xdata()) == [0.5, 1.0, 1.5]
    assert list(panel.lines[0].get_ydata()) == pytest.approx([0.1, 0.2, 0.3])
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert plot_run(tmp_path).stat().st_size > 0


def test_a_completion_that_never_stops_is_trained_below_a_wrong_answer(ray_cluster):
    from plait.rl.generator import GenerationConfig, Generator, Work
    from plait.rl.trainer import collate
    from plait.rl.weights import publish

    cfg = GPTConfig(vocab_size=TOK.vocab_size, d_model=32, n_layers=1, n_heads=2, max_seq_len=16)
    model = GPT(cfg)
    gen = Generator(cfg, GenerationConfig(group_size=4, prompts_per_call=1, max_new_tokens=1), seed=0, index=0)
    out = gen.generate(Work(0, [0], make_tasks("digit_sum", 1), 1), publish(dict(model.named_parameters()), 0))
    assert not out.finished.any()  # one token of budget: no row reaches eos
    assert out.train_rewards.tolist() == [-1.0] * 4 and set(out.rewards.tolist()) <= {0.0, 1.0}  # metrics: the score
    out.finished[0], out.train_rewards[0] = True, 0.0  # as if row 0 had stopped after a wrong answer
    adv = collate([out], dp=1)[0][0]["advantages"]
    assert adv[0] > 0 > adv[1] and adv[1] == adv[2] == adv[3]  # stopping with a wrong answer beats not stopping


# ---------------------------------------------------------------- broadcast weight sync (gloo, standalone group)

# Every round's group timeout: a generous bound, as rl.weight_sync_timeout_s is in a job (60 s). A dead member
# fails a round at once (gloo sees the closed connection); the bound only stops a round that would hang, and
# it must cover a member whose process is slow to be scheduled on a machine loaded several times over.
SYNC_TIMEOUT_S = 60.0


def test_broadcast_weight_sync_gives_two_generator_actors_the_trainers_versions_and_survives_a_dead_one(ray_actors):
    import os
    import signal

    import ray
    from plait.rl.generator import GenerationConfig, Generator
    from plait.rl.weight_broadcast import WeightServer

    cfg = GPTConfig(vocab_size=54, d_model=32, n_layers=1, n_heads=2, max_seq_len=16)
    torch.manual_seed(0)
    trainer = GPT(cfg)
    remote = ray.remote(num_cpus=1)(Generator)

    def start_generator(i):
        """A generator actor, running (as ActorPool.replace leaves one) before it is asked to join a round."""
        actor = remote.remote(cfg, GenerationConfig(), 0, i)
        ray_actors.append(actor)
        ray.get(actor.__ray_call__.remote(lambda g: g.index))
        return actor

    def weights(actor):
        return ray.get(actor.__ray_call__.remote(lambda g: {n: p.detach().clone()
                                                            for n, p in g.model.named_parameters()}))

    def sync(round_id, epoch, version):
        return ray.get([g.sync_weights.remote(server.address, round_id, epoch, 3, version, SYNC_TIMEOUT_S)
                        for g in gens])

    gens = [start_generator(i) for i in range(2)]
    # the trainer's side, in this process; buckets of 1000 floats, most straddling two parameters
    server = WeightServer("127.0.0.1", timeout_s=SYNC_TIMEOUT_S, bucket_mb=1000 * 4 / 2**20)
    try:
        for version in range(3):  # a new version after every "step"; each round delivers the one asked for
            server.update(dict(trainer.named_parameters()), version)
            assert sync(version + 1, 0, version) == [version, version]
            for actor in gens:
                assert all(torch.equal(w, p)
                           for w, p in zip(weights(actor).values(), trainer.parameters(), strict=True))
            with torch.no_grad():
                for p in trainer.parameters():
                    p.add_(0.01 * torch.randn_like(p))
        assert server.rounds_served == 3 and server.bucket == 1000
        n = sum(p.numel() for p in trainer.parameters())
        assert n // server.bucket >= 10 and n % server.bucket  # many buckets, the last one partial
        with pytest.raises(ValueError, match="versions only grow"):
            server.update(dict(trainer.named_parameters()), 1)

        # a generator killed before round 4: the survivor's round fails (the server's too) instead of hanging
        os.kill(ray.get(gens[1].__ray_call__.remote(lambda g: os.getpid())), signal.SIGKILL)
        server.update(dict(trainer.named_parameters()), 3)
        with pytest.raises(ray.exceptions.RayError):
            ray.get(gens[0].sync_weights.remote(server.address, 4, 0, 3, 3, SYNC_TIMEOUT_S))
        gens[1] = start_generator(1)  # its replacement: the next round is a new epoch
        assert sync(5, 1, 3) == [3, 3] and server.rounds_failed == 1 and server.rounds_served == 4
        assert all(torch.equal(w, p) for w, p in zip(weights(gens[1]).values(), trainer.parameters(), strict=True))
    finally:
        server.close()


def test_a_dict_rewards_numeric_extras_are_averaged_over_the_samples_that_carry_them():
    from plait.rl.generator import sum_extras
    from plait.rl.rl_job import mean_extras

    first = sum_extras([{"format_ok": 1, "note": "text"}, {"format_ok": 0, "steps": 3.0}, {}])
    second = sum_extras([{"format_ok": True}, {"reward_error": 1.0}])
    assert first == {"format_ok": (1.0, 2), "steps": (3.0, 1)}
    assert mean_extras([first, second], "reward_") == {"reward_format_ok": 2 / 3, "reward_steps": 3.0}
