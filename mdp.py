"""The paper's synthetic experiment: with a huge action space, a full-vocabulary entropy bonus
stops helping as optimal actions become few, and a clamped one keeps helping.

The MDP (our design; the paper publishes only |A| = 1e5 and a tabular softmax policy):
  - Horizon H = 4; the state is the step index; |A| = 100,000 actions in every state.
  - In each state m actions are correct (m swept over 1, 2, 5, 10, 20) and one is a decoy.
    An action earns 1 if correct, 0.5 if it is the decoy, 0 otherwise; the return is the
    mean over the H steps. The value reported is the probability of an optimal trajectory,
    V = prod_h pi_h(A*_h).
  - The initial policy mimics a pretrained LM: 100 plausible actions per state (the correct
    ones, the decoy, and others), drawn at random, share 90% of the probability, the decoy 8x as
    likely as each other plausible action; all logits carry N(0, 1) noise. Without an entropy
    bonus the policy is drawn into the decoy before it finds the correct actions.
  - Optimiser: exact policy gradient (the expected return and the entropy are sums over the
    tabular policy, differentiated by autograd), plain gradient ascent on the logits with step
    size 200 for 500 steps; 5 seeds (each draws its own plausible, correct and decoy actions and
    noise). The same step size, steps and coefficient range for every method.
  - Methods, each maximising  return + lambda * mean_h H(pi_h):
      none     lambda = 0
      full     H over all 100,000 actions, lambda = 0.1
      clamped  H over the 100 highest logits (`aent.clamped_entropy`, top_k=100), lambda = 0.1
      aent     clamped, lambda adapted by `aent.update_entropy_coef` from lambda_0 = 0.1 within
               [0.01, 0.2], band [0.1, 0.5] nats, step 0.02, held for the first 50 steps.

    python mdp.py                                  # the full run: about 2 minutes on 2 CPU cores
    python mdp.py --seeds 2 --steps 200 --ms 1 20  # a quick look
"""

import argparse
import json
import os
import time

import torch

from aent import clamped_entropy, update_entropy_coef

METHODS = ("none", "full", "clamped", "aent")


def make_problem(m, seeds, a, gen):
    """Initial logits [S, H, A], reward per action [S, H, A], and the mask of correct actions."""
    S, H, A, P = seeds, a.horizon, a.actions, a.plausible
    plausible = torch.rand(S, H, A, generator=gen).argsort(-1)[
        ..., :P
    ]  # [S, H, P]; the first is the decoy
    # choose c so that the plausible actions hold a.plausible_mass of the probability
    c = torch.tensor(
        a.plausible_mass / (1 - a.plausible_mass) * (A - P) / (P - 1 + a.decoy_weight)
    ).log()
    logits = torch.randn(S, H, A, generator=gen) * a.noise  # [S, H, A]
    logits.scatter_add_(2, plausible, c.expand(S, H, P).contiguous())
    logits.scatter_add_(
        2, plausible[..., :1], torch.tensor(a.decoy_weight).log().expand(S, H, 1).contiguous()
    )
    reward = (
        torch.zeros(S, H, A)
        .scatter_(2, plausible[..., 1 : 1 + m], 1.0)
        .scatter_(2, plausible[..., :1], 0.5)
    )
    return logits, reward, reward == 1.0


def train(method, m, a):
    """Train a.seeds policies at once; their values V after every step, [steps + 1, seeds]."""
    gen = torch.Generator().manual_seed(a.seed + m)  # every method sees the same problems
    logits, reward, correct = make_problem(m, a.seeds, a, gen)
    logits.requires_grad_()
    coef = [0.0 if method == "none" else a.coef] * a.seeds
    values = []
    for step in range(a.steps + 1):
        probs = logits.softmax(-1)  # [S, H, A]
        values.append(probs.detach().masked_fill(~correct, 0).sum(-1).prod(-1))  # [S]
        if step == a.steps:
            break
        objective = (probs * reward).sum(-1).mean(-1)  # [S] expected return
        if method != "none":
            entropy = clamped_entropy(logits, top_k=None if method == "full" else a.plausible).mean(
                -1
            )  # [S]
            objective = objective + torch.tensor(coef) * entropy
        logits.grad = None
        objective.sum().backward()
        with torch.no_grad():
            logits += a.lr * logits.grad
        if method == "aent" and step + 1 >= a.coef_warmup:
            coef = [
                update_entropy_coef(c, h, a.h_low, a.h_high, a.coef_lr, a.coef_min, a.coef_max)
                for c, h in zip(coef, entropy.tolist())
            ]
    return torch.stack(values)  # [steps + 1, S]


def plot(results, curves, ms, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for method in METHODS:
        mean = [results[method][str(m)]["mean"] for m in ms]
        std = [results[method][str(m)]["std"] for m in ms]
        left.errorbar(ms, mean, yerr=std, marker="o", capsize=3, label=method)
        curve = torch.tensor(curves[method])  # [steps + 1, S]
        right.plot(curve.mean(1), label=method)
        right.fill_between(
            range(curve.size(0)), curve.min(1).values, curve.max(1).values, alpha=0.15
        )
    left.set(
        xscale="log",
        xlabel="optimal actions per state, m",
        ylabel="final value V",
        title="Final value (mean ± std over seeds)",
    )
    left.set_xticks(ms, [str(m) for m in ms])
    right.set(
        xlabel="step",
        ylabel="value V",
        title=f"Training at m = {min(ms)} (mean; band: min to max over seeds)",
    )
    for ax in (left, right):
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--out", default="runs/mdp", help="output directory for results.json and mdp.png"
    )
    p.add_argument(
        "--ms",
        type=int,
        nargs="+",
        default=[1, 2, 5, 10, 20],
        help="numbers of optimal actions per state to sweep",
    )
    p.add_argument("--seeds", type=int, default=5, help="seeds per method and m")
    p.add_argument("--seed", type=int, default=0, help="base seed")
    p.add_argument("--steps", type=int, default=500, help="gradient-ascent steps")
    p.add_argument(
        "--lr", type=float, default=200.0, help="gradient-ascent step size on the logits"
    )
    p.add_argument("--actions", type=int, default=100_000, help="|A|, actions per state")
    p.add_argument("--horizon", type=int, default=4, help="H, steps per episode")
    p.add_argument(
        "--plausible",
        type=int,
        default=100,
        help="plausible actions per state; also the clamped entropy's top_k",
    )
    p.add_argument(
        "--plausible-mass",
        type=float,
        default=0.9,
        help="initial probability of the plausible actions together",
    )
    p.add_argument(
        "--decoy-weight",
        type=float,
        default=8.0,
        help="initial probability of the decoy over that of another plausible action",
    )
    p.add_argument(
        "--noise", type=float, default=1.0, help="std of the N(0, s) noise on the initial logits"
    )
    p.add_argument(
        "--coef", type=float, default=0.1, help="entropy coefficient lambda (AEnt's initial one)"
    )
    p.add_argument("--coef-min", type=float, default=0.01, help="AEnt: lower bound of lambda")
    p.add_argument("--coef-max", type=float, default=0.2, help="AEnt: upper bound of lambda")
    p.add_argument(
        "--coef-lr", type=float, default=0.02, help="AEnt: step size of the coefficient update"
    )
    p.add_argument(
        "--coef-warmup",
        type=int,
        default=50,
        help="AEnt: steps during which lambda stays at its initial value",
    )
    p.add_argument(
        "--h-low",
        type=float,
        default=0.1,
        help="AEnt: lower edge of the clamped-entropy band (nats)",
    )
    p.add_argument("--h-high", type=float, default=0.5, help="AEnt: upper edge of the band")
    a = p.parse_args(argv)
    if (
        a.seeds < 1
        or a.steps < 1
        or not 0 < a.plausible_mass < 1
        or not 1 <= max(a.ms) < a.plausible
    ):
        p.error("need --seeds and --steps >= 1, 0 < --plausible-mass < 1, and 1 <= m < --plausible")

    t0 = time.time()
    results, curves = {method: {} for method in METHODS}, {}
    for m in a.ms:
        for method in METHODS:
            values = train(method, m, a)  # [steps + 1, S]
            final = values[-1]
            results[method][str(m)] = {
                "mean": final.mean().item(),
                "std": final.std().item() if a.seeds > 1 else 0.0,
                "per_seed": final.tolist(),
            }
            if m == min(a.ms):
                curves[method] = values.tolist()
        print(f"m = {m:>3} done ({time.time() - t0:.0f} s)", flush=True)

    print(
        f"\nfinal value V, mean ± std over {a.seeds} seeds "
        f"(|A| = {a.actions}, H = {a.horizon}, {a.steps} steps)"
    )
    print("m".rjust(4) + "".join(k.rjust(16) for k in METHODS))
    for m in a.ms:
        print(
            str(m).rjust(4)
            + "".join(
                f"{results[k][str(m)]['mean']:.3f} ± {results[k][str(m)]['std']:.3f}".rjust(16)
                for k in METHODS
            )
        )
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump({"settings": vars(a), "final_value": results, "values_at_sparsest_m": curves}, f)
    plot(results, curves, a.ms, os.path.join(a.out, "mdp.png"))
    print(f"wrote {a.out}/results.json and {a.out}/mdp.png ({time.time() - t0:.0f} s)")
    return results


if __name__ == "__main__":
    main()
