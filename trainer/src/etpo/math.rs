//! The ETPO equations as plain functions on candle tensors.
//!
//! Every function takes per-position vocabulary rows: a tensor whose last dimension is the
//! vocabulary (`[N, V]` for N positions, or `[B, T, V]`), and reduces over that last dimension.
//! A "context" below is `(s, w^{1:j})`: a state prompt followed by the first `j` tokens of an
//! action; the row of a causal language model at the last position of a context is the
//! distribution over the next token.
//!
//! Equation numbers refer to Wen et al. 2024, "Entropy-Regularized Token-Level Policy
//! Optimization for Language Agent Reinforcement" (shared/paper/etpo-paper.txt).

use candle_core::{DType, Result, Tensor, D};
use serde::{Deserialize, Serialize};

/// How the soft Q-values `Q(context, w)` are read out of the Q-network, a causal language model.
///
/// The paper initialises Q with ρ and leaves the read-out open. The default is
/// [`QReadout::Dueling`], the only reading under which the soft value of a context can move
/// (and so carry a reward to the tokens before the last and to the step before);
/// `trainer/tests/integration/etpo_credit.rs` measures the difference (README, "ETPO").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum QReadout {
    /// The paper's literal reading: Q is the Q-network's logits. At the start Q equals ρ's
    /// logits, so the policy target softmax(Q/β) of Eq. 7 is ρ sharpened to temperature β
    /// (ρ's greedy choice at β = 0.01, whatever the rewards). Kept as the paper's ablation.
    Logits,
    /// `Q(c, w) = V_ψ(c) + β·log(π_Q(w|c)/ρ(w|c))`: a value head `V_ψ` on the Q-network's final
    /// hidden state plus β times the log-ratio of the Q-network's next-token distribution π_Q
    /// to ρ (a dueling network whose advantage is a log-ratio).
    ///
    /// - The soft value of a context under ρ, `β·log E_{w~ρ}[exp(Q(c,w)/β)]`, is exactly
    ///   `V_ψ(c)`: it is free to hold any return. (The log-ratio alone, `V_ψ = 0`, pins it at 0,
    ///   so the Eq. 6 bracket of every context was `−β·KL(π‖π_Q̄) ≤ 0` whatever the rewards,
    ///   and only an action's last token ever saw a reward.)
    /// - The optimum of Eq. 7, `π* ∝ ρ·exp(Q/β)`, is π_Q itself.
    /// - At the start (adapters with B = 0, head at zero) `Q = 0` and `π = π_Q = ρ` exactly.
    #[default]
    Dueling,
}

impl std::fmt::Display for QReadout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            QReadout::Logits => "logits",
            QReadout::Dueling => "dueling",
        })
    }
}

impl std::str::FromStr for QReadout {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "logits" => Ok(QReadout::Logits),
            "dueling" => Ok(QReadout::Dueling),
            "log-ratio" => {
                Err("the `log-ratio` Q read-out was removed: its soft value is pinned at 0, so rewards never \
                 reached tokens before an action's last; use `dueling` (its value head makes the soft value free)"
                    .into())
            }
            other => Err(format!("unknown Q read-out `{other}` (expected `dueling` or `logits`)")),
        }
    }
}

/// Numerically stable log-softmax over the last dimension: `x − max − log Σ exp(x − max)`.
///
/// One fused pass on the CPU (see [`crate::ops::log_softmax`]). Never compute
/// `log(softmax(x))`, which underflows to `−inf` for unlikely tokens.
pub fn log_softmax(logits: &Tensor) -> Result<Tensor> {
    crate::ops::log_softmax(&logits.to_dtype(DType::F32)?).map_err(|e| candle_core::Error::Msg(e.to_string()))
}

/// Q-values `Q(context, ·)` from the Q-network's logits, per [`QReadout`].
///
/// `ref_logp` is ρ's log-softmax at the same rows; `value` holds the Q-network's value head
/// `V_ψ(c)` at the rows (`[N]`), which [`QReadout::Dueling`] needs and [`QReadout::Logits`]
/// ignores.
pub fn q_values(
    q_logits: &Tensor,
    value: Option<&Tensor>,
    ref_logp: &Tensor,
    readout: QReadout,
    beta: f64,
) -> Result<Tensor> {
    match readout {
        QReadout::Logits => q_logits.to_dtype(DType::F32),
        QReadout::Dueling => {
            let value = value.ok_or_else(|| {
                candle_core::Error::Msg("the dueling Q read-out needs the value head's values".into())
            })?;
            ((log_softmax(q_logits)? - ref_logp)? * beta)?.broadcast_add(&value.to_dtype(DType::F32)?.unsqueeze(1)?)
        }
    }
}

/// The soft value of a context under ρ, `β·log Σ_w ρ(w)·exp(Q(w)/β)`, per row: the value of
/// the KL-regularised optimum `π* ∝ ρ·exp(Q/β)`. Under [`QReadout::Dueling`] it is `V_ψ(c)`.
pub fn soft_value_under_reference(q: &Tensor, ref_logp: &Tensor, beta: f64) -> Result<Tensor> {
    let x = ((q / beta)? + ref_logp)?;
    let max = x.max_keepdim(D::Minus1)?;
    let lse = (x.broadcast_sub(&max)?.exp()?.sum_keepdim(D::Minus1)?.log()? + max)?;
    lse.squeeze(D::Minus1)? * beta
}

/// `KL(π‖ρ)(context) = Σ_w π(w) (log π(w) − log ρ(w))`, per row.
pub fn kl_rows(policy_logp: &Tensor, ref_logp: &Tensor) -> Result<Tensor> {
    (policy_logp.exp()? * (policy_logp - ref_logp)?)?.sum(D::Minus1)
}

/// Entropy `−Σ_w π(w) log π(w)`, per row.
pub fn entropy_rows(policy_logp: &Tensor) -> Result<Tensor> {
    (policy_logp.exp()? * policy_logp)?.sum(D::Minus1)?.neg()
}

/// The soft value of a context, the bracket of Eq. 6, per row:
/// `V(c) = Σ_w π(w|c)·Q̄(c, w) − β·KL(π‖ρ)(c)`, exact over the full vocabulary.
///
/// `q_bar` holds the target network's Q-values at the same rows (see [`q_values`]).
pub fn soft_values(policy_logp: &Tensor, q_bar: &Tensor, ref_logp: &Tensor, beta: f64) -> Result<Tensor> {
    let expected_q = (policy_logp.exp()? * q_bar)?.sum(D::Minus1)?;
    expected_q - (kl_rows(policy_logp, ref_logp)? * beta)?
}

/// Per-token soft Bellman targets of one action, Eq. 6.
///
/// - `inside[j-1] = V(s, w^{1:j})` for `j = 1 .. n−1` (see [`soft_values`]): the targets of the
///   tokens before the last, `q_targ(j) = V(s, w^{1:j})`, undiscounted (the paper's ETPO);
///   with `discount_inside` they are multiplied by γ, the ablation ETPO(disc.) of Appendix G.
/// - The last token: `q_targ(n) = r + γ·V(s')` where `next_value = Some(V(s'))` is the soft
///   value of the next state's first-token distribution; `None` (the episode ended) gives `r`.
///
/// Returns the `n = inside.len() + 1` targets in token order.
pub fn soft_bellman_targets(
    inside: &[f64],
    reward: f64,
    next_value: Option<f64>,
    gamma: f64,
    discount_inside: bool,
) -> Vec<f64> {
    let inside_factor = if discount_inside { gamma } else { 1.0 };
    let mut targets: Vec<f64> = inside.iter().map(|v| inside_factor * v).collect();
    targets.push(reward + next_value.map_or(0.0, |v| gamma * v));
    targets
}

/// Eq. 6's targets of one action carried back along the tokens taken, with tree-backup traces
/// (TB(λ), Precup et al. 2000): for `j = n−1 .. 1`,
///
/// `q_targ(j) ← q_targ(j) + f·λ·π(w^{j+1}|c_{j+1})·(q_targ(j+1) − Q̄(c_{j+1}, w^{j+1}))`
///
/// where `one_step` are the targets of [`soft_bellman_targets`] (updated in place, last first),
/// `taken_q[j]` and `taken_prob[j]` are Q̄ and π at row `j+1` for the token taken there (row 0,
/// the state's, is unused), and `f` is γ with `discount_inside`, else 1.
///
/// Why: Eq. 6 moves a reward one token back per update (each target bootstraps from the next
/// position's soft value), so in a 30-token action it reaches the decisive token only after 30
/// updates, while the value head's shared level runs ahead of the lagging targets and the
/// difference lands in the log-ratios of the tokens taken. The trace replaces the expected
/// value at `c_{j+1}` by what followed the token actually taken, weighted by π's probability of
/// it: through near-certain tokens the return passes whole; at a branch it is cut to the
/// expectation, so the target stays unbiased for any sampler (replayed actions included).
/// `λ = 0` is Eq. 6 as written.
pub fn tree_backup_targets(one_step: &mut [f64], taken_q: &[f64], taken_prob: &[f64], lambda: f64, f: f64) {
    let n = one_step.len();
    assert!(taken_q.len() == n && taken_prob.len() == n);
    if lambda == 0.0 {
        return;
    }
    for j in (0..n.saturating_sub(1)).rev() {
        let trace = f * lambda * taken_prob[j + 1];
        one_step[j] += trace * (one_step[j + 1] - taken_q[j + 1]);
    }
}

/// The conservative term of the Q loss (CQL, Kumar et al. 2020, with ρ as the prior over
/// tokens), per row: `β·log E_{w~ρ}[exp(Q(c,w)/β)] − Q(c, w_taken)`, the soft value of the
/// context under ρ minus the value of the token taken. Minimising it lowers every token's value
/// relative to the ones the data hold. With the dueling read-out it is exactly
/// `−β·log(π_Q(w_taken|c)/ρ(w_taken|c))`.
///
/// Why: only taken tokens get targets. When a taken token's value falls (its action failed),
/// the Q-network's distribution π_Q, and the policy that follows it, move that mass onto every
/// token never tried, valued by nothing but the context's level: on Balance Scale the policy's
/// entropy rose above ρ's and the actions became invented keyword arguments (README, "ETPO").
pub fn conservative_term(q: &Tensor, q_taken: &Tensor, ref_logp: &Tensor, beta: f64) -> Result<Tensor> {
    soft_value_under_reference(q, ref_logp, beta)? - q_taken
}

/// `β·KL(π_Q ‖ ρ)` per row, with `π_Q ∝ ρ·exp(Q/β)` the Q-network's soft-optimal policy (under
/// [`QReadout::Dueling`] its own next-token distribution); gradients reach Q. As a term of the Q
/// loss it is a prior on the advantages: where no data speak for a token, its Q-value is held at
/// the context's soft value instead of drifting with what the squared error takes from the tokens
/// that were tried. Why it matters: with the previous policy as the policy target's prior
/// (`reference_weight` < 1) every update multiplies π_k by π_Q/ρ, so ratios that are noise where
/// no data speak compound; on Balance Scale they did, and the policy became as random as ρ
/// (README, "ETPO").
pub fn q_reference_kl(q: &Tensor, ref_logp: &Tensor, beta: f64) -> Result<Tensor> {
    let q_logp = log_softmax(&((q / beta)? + ref_logp.detach())?)?;
    kl_rows(&q_logp, &ref_logp.detach())? * beta
}

/// `Q(context_j, w^{j+1})`: the Q-value of the token taken at each row. `tokens` is `[N]` u32.
pub fn taken_values(q: &Tensor, tokens: &Tensor) -> Result<Tensor> {
    q.gather(&tokens.unsqueeze(1)?, 1)?.squeeze(1)
}

/// The Q loss of Algorithm 1: mean over the given action tokens of `(q − q_targ)²`, or, with
/// `huber_delta = Some(δ)`, of the Huber loss scaled to agree with it near zero
/// (`d²` for `|d| ≤ δ`, `2δ|d| − δ²` beyond). `targets` are constants.
pub fn q_loss(q_taken: &Tensor, targets: &Tensor, huber_delta: Option<f64>) -> Result<Tensor> {
    let diff = (q_taken - targets.detach())?;
    match huber_delta {
        None => diff.sqr()?.mean_all(),
        Some(delta) => {
            let abs = diff.abs()?;
            let quad = abs.clamp(0.0, delta)?;
            let lin = (&abs - &quad)?;
            (quad.sqr()? + (lin * (2.0 * delta))?)?.mean_all()
        }
    }
}

/// Log-probabilities of the policy target of Eq. 7 at each row, as a constant:
/// `softmax(Q/β)` for [`QReadout::Logits`] (the paper's `exp(Q/β)` normalised), and
/// `∝ ρ·exp(Q/β)` for [`QReadout::Dueling`] (Appendix B's optimum, equal to π_Q: the value
/// head adds the same constant to every token of a row).
pub fn policy_target_logp(q: &Tensor, ref_logp: &Tensor, readout: QReadout, beta: f64) -> Result<Tensor> {
    let scaled = (q.detach() / beta)?;
    match readout {
        QReadout::Logits => log_softmax(&scaled),
        QReadout::Dueling => log_softmax(&(scaled + ref_logp.detach())?),
    }
}

/// Eq. 7's target read straight from the Q-network's logits (a constant), equal to
/// [`policy_target_logp`] of the Q-values they give: `softmax(logits/β)` for [`QReadout::Logits`],
/// and π_Q's own distribution, `softmax(logits)`, for [`QReadout::Dueling`] (there
/// `Q/β + log ρ = log π_Q + V_ψ/β`, and the value head's constant cancels in the normalisation).
/// The update uses this form so that it needs neither ρ's distribution nor the value head here.
pub fn policy_target_from_q_logits(q_logits: &Tensor, readout: QReadout, beta: f64) -> Result<Tensor> {
    let logits = q_logits.detach().to_dtype(DType::F32)?;
    match readout {
        QReadout::Logits => log_softmax(&(logits / beta)?),
        QReadout::Dueling => log_softmax(&logits),
    }
}

/// Under [`QReadout::Dueling`], `Q(c, w)` of the taken tokens only,
/// `V_ψ(c) + β·(log π_Q(w|c) − log ρ(w|c))`, from the two log-probabilities of each taken token
/// (`[N]` each) and the value head's `[N]` values: [`taken_values`] of [`q_values`] without ρ's
/// full distribution, which the update keeps only at the taken tokens.
pub fn dueling_taken_values(
    q_logp_taken: &Tensor,
    ref_logp_taken: &Tensor,
    value: &Tensor,
    beta: f64,
) -> Result<Tensor> {
    ((q_logp_taken - ref_logp_taken.detach())? * beta)? + value.to_dtype(DType::F32)?
}

/// Under [`QReadout::Dueling`], the [`conservative_term`] is `V_ψ(c) − Q(c, w_taken)`: the soft
/// value of a context under ρ is the head's value exactly.
pub fn dueling_conservative_term(value: &Tensor, q_taken: &Tensor) -> Result<Tensor> {
    value.to_dtype(DType::F32)? - q_taken
}

/// Eq. 7's target with the prior `ρ^τ·π_k^(1−τ)` in place of ρ, π_k the policy before the
/// update and τ = `reference_weight`: `log_softmax(target + (1−τ)·(log π_k − log ρ))`, the
/// target of [`policy_target_logp`] (`∝ ρ·exp(Q/β)`) times `(π_k/ρ)^(1−τ)`. So the target is
/// `∝ ρ^τ·π_k^(1−τ)·exp(A/β)`, with `A = Q − β·log E_ρ[exp(Q/β)]` the advantage over the soft
/// value (the soft value cancels in the normalisation; with [`QReadout::Dueling`]
/// `exp(A/β) = π_Q/ρ`).
///
/// τ = 1 is Eq. 7 as written. τ = 0 is the step of mirror-descent policy optimisation (MPO's
/// E-step, Abdolmaleki et al. 2018, at temperature β): where the Q-network sees no difference
/// between tokens the target is π_k itself, so a policy that has learnt a task is not pulled
/// back to ρ's randomness once every action it writes pays the same. It also multiplies π_k by
/// whatever the Q-network prefers at every update: on Balance Scale, where π_Q came to prefer
/// tokens ρ rarely writes, moving τ from 1 to 0 over a run made the late collapse come sooner
/// (README, "ETPO").
pub fn prior_mixed_target_logp(
    target_logp: &Tensor,
    ref_logp: &Tensor,
    previous_logp: &Tensor,
    reference_weight: f64,
) -> Result<Tensor> {
    let toward_previous = ((previous_logp.detach() - ref_logp.detach())? * (1.0 - reference_weight))?;
    log_softmax(&(target_logp.detach() + toward_previous)?)
}

/// The per-token policy loss of Eq. 7, per row: `KL(π(·|c) ‖ target(·|c))` over the full
/// vocabulary, from π's logits and `target_logp` (from [`policy_target_logp`]). Gradients flow
/// into π only. Fused on the CPU ([`crate::ops::kl_from_logits`]): no `[rows × vocabulary]`
/// tensor but the logits and the gradient is kept.
pub fn policy_kl_rows(policy_logits: &Tensor, target_logp: &Tensor) -> Result<Tensor> {
    crate::ops::kl_from_logits(policy_logits, target_logp).map_err(|e| candle_core::Error::Msg(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn t(rows: &[&[f32]]) -> Tensor {
        let v = rows[0].len();
        let flat: Vec<f32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
        Tensor::from_vec(flat, (rows.len(), v), &Device::Cpu).unwrap()
    }

    fn v1(x: &Tensor) -> Vec<f32> {
        x.to_vec1::<f32>().unwrap()
    }

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol * (1.0 + b.abs())
    }

    #[test]
    fn log_softmax_is_stable_for_huge_logits() {
        let x = t(&[&[1000.0, 0.0, -1000.0]]);
        let lp = log_softmax(&x).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(lp[0][0], 0.0);
        assert!((lp[0][1] + 1000.0).abs() < 1e-3);
        assert!((lp[0][2] + 2000.0).abs() < 1e-3, "no underflow to -inf: {}", lp[0][2]);
    }

    #[test]
    fn soft_value_by_hand() {
        // π = (0.5, 0.5), ρ = (0.25, 0.75), Q̄ = (2, -1), β = 0.1.
        // E_π Q̄ = 0.5; KL = 0.5 ln(0.5/0.25) + 0.5 ln(0.5/0.75) = 0.5 ln 2 + 0.5 ln(2/3).
        let pol = t(&[&[0.5f32.ln(), 0.5f32.ln()]]);
        let rf = t(&[&[0.25f32.ln(), 0.75f32.ln()]]);
        let qb = t(&[&[2.0, -1.0]]);
        let kl = 0.5 * 2f64.ln() + 0.5 * (2.0f64 / 3.0).ln();
        let v = v1(&soft_values(&pol, &qb, &rf, 0.1).unwrap());
        assert!(close(v[0] as f64, 0.5 - 0.1 * kl, 1e-6), "{v:?}");
        let k = v1(&kl_rows(&pol, &rf).unwrap());
        assert!(close(k[0] as f64, kl, 1e-6));
        let h = v1(&entropy_rows(&pol).unwrap());
        assert!(close(h[0] as f64, 2f64.ln(), 1e-6));
    }

    #[test]
    fn q_readouts() {
        let ql = t(&[&[1.0, 2.0, 3.0]]);
        let rl = log_softmax(&t(&[&[0.0, 0.0, 0.0]])).unwrap();
        assert_eq!(
            v1(&q_values(&ql, None, &rl, QReadout::Logits, 0.5).unwrap().squeeze(0).unwrap()),
            vec![1.0, 2.0, 3.0]
        );
        // Dueling: V + β (log softmax(1,2,3) − log(1/3)), V = 0.7.
        let value = Tensor::new(&[0.7f32], &Device::Cpu).unwrap();
        let lse = (1f64.exp() + 2f64.exp() + 3f64.exp()).ln();
        let q = q_values(&ql, Some(&value), &rl, QReadout::Dueling, 0.5).unwrap();
        for (k, g) in v1(&q.squeeze(0).unwrap()).iter().enumerate() {
            let want = 0.7 + 0.5 * ((k as f64 + 1.0) - lse + 3f64.ln());
            assert!(close(*g as f64, want, 1e-6), "{k}: {g} vs {want}");
        }
        assert!(q_values(&ql, None, &rl, QReadout::Dueling, 0.5).is_err(), "dueling without values");
        // The soft value under ρ is the head's value, whatever the log-ratio part.
        let soft = v1(&soft_value_under_reference(&q, &rl, 0.5).unwrap())[0] as f64;
        assert!(close(soft, 0.7, 1e-6), "{soft}");
        // By hand for a Q that is not of that form: β log Σ ρ e^{Q/β}, ρ uniform, Q = (1, 2, 3).
        let want = 0.5 * ((2f64.exp() + 4f64.exp() + 6f64.exp()) / 3.0).ln();
        assert!(close(v1(&soft_value_under_reference(&ql, &rl, 0.5).unwrap())[0] as f64, want, 1e-6));
        // The policy target ∝ ρ·exp(Q/β) is π_Q, whatever V is.
        let tgt = policy_target_logp(&q, &rl, QReadout::Dueling, 0.5).unwrap();
        let d =
            (tgt - log_softmax(&ql).unwrap()).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(d < 1e-5, "{d}");
        // Q-network = ρ and V = 0 give Q = 0 and the policy target ρ itself.
        let zero = Tensor::new(&[0.0f32], &Device::Cpu).unwrap();
        let same = q_values(&rl, Some(&zero), &rl, QReadout::Dueling, 0.01).unwrap();
        assert!(v1(&same.abs().unwrap().sum(1).unwrap())[0] < 1e-7);
        let tgt = policy_target_logp(&same, &rl, QReadout::Dueling, 0.01).unwrap();
        assert!(v1(&(tgt - &rl).unwrap().abs().unwrap().sum(1).unwrap())[0] < 1e-6);
        assert!("log-ratio".parse::<QReadout>().unwrap_err().contains("dueling"));
        assert_eq!("dueling".parse::<QReadout>().unwrap(), QReadout::Dueling);
    }

    /// Eq. 6 on a 2-step episode with 2-token actions, V = 2, written out by hand.
    ///
    /// Step 1: state s0, action (w1, w2), reward r0 = 0.5, next state s1.
    /// Step 2: state s1, action (u1, u2), reward r1 = 1.0, episode ends.
    #[test]
    fn eq6_two_step_episode_by_hand() {
        let beta = 0.1;
        let gamma = 0.9;
        // Rows: c0 = (s0, w1) [inside step 1]; c1 = s1 [first-token row of step 2];
        // c2 = (s1, u1) [inside step 2].
        let pol = log_softmax(&t(&[&[0.0, 0.0], &[1.0, 0.0], &[0.0, 2.0]])).unwrap();
        let rf = log_softmax(&t(&[&[0.0, 1.0], &[0.0, 0.0], &[0.0, 0.0]])).unwrap();
        let qb = t(&[&[1.0, 3.0], &[-1.0, 2.0], &[0.5, 0.0]]);
        let v = soft_values(&pol, &qb, &rf, beta).unwrap().to_vec1::<f32>().unwrap();

        // Hand values.
        let sm = |a: f64, b: f64| {
            let m = a.max(b);
            let z = (a - m).exp() + (b - m).exp();
            ((a - m).exp() / z, (b - m).exp() / z)
        };
        let value = |p: (f64, f64), r: (f64, f64), q: (f64, f64)| {
            p.0 * q.0 + p.1 * q.1 - beta * (p.0 * (p.0 / r.0).ln() + p.1 * (p.1 / r.1).ln())
        };
        let v0 = value(sm(0.0, 0.0), sm(0.0, 1.0), (1.0, 3.0));
        let v1_ = value(sm(1.0, 0.0), sm(0.0, 0.0), (-1.0, 2.0));
        let v2 = value(sm(0.0, 2.0), sm(0.0, 0.0), (0.5, 0.0));
        for (got, want) in v.iter().zip([v0, v1_, v2]) {
            assert!(close(*got as f64, want, 1e-5), "{got} vs {want}");
        }

        // Step 1: token 1 takes V(s0,w1) undiscounted; token 2 takes r0 + γ V(s1).
        let step1 = soft_bellman_targets(&[v[0] as f64], 0.5, Some(v[1] as f64), gamma, false);
        assert!(close(step1[0], v0, 1e-5));
        assert!(close(step1[1], 0.5 + gamma * v1_, 1e-5));
        // Step 2 ends the episode: no bootstrap at the last token.
        let step2 = soft_bellman_targets(&[v[2] as f64], 1.0, None, gamma, false);
        assert!(close(step2[0], v2, 1e-5));
        assert_eq!(step2[1], 1.0);
        // ETPO(disc.): γ inside the action too; the last token is unchanged.
        let disc = soft_bellman_targets(&[v[0] as f64], 0.5, Some(v[1] as f64), gamma, true);
        assert!(close(disc[0], gamma * v0, 1e-5));
        assert_eq!(disc[1], step1[1]);
        // A one-token action has only the last-token case.
        assert_eq!(soft_bellman_targets(&[], -1.0, Some(2.0), 0.5, false), vec![0.0]);
    }

    #[test]
    fn the_prior_mixes_rho_and_the_previous_policy() {
        // ρ = (0.5, 0.25, 0.25), π_Q = (0.2, 0.6, 0.2), π_k = (0.25, 0.5, 0.25), V = 0.4, β = 0.1.
        let beta = 0.1f64;
        let (rho, pq, pk) = ([0.5f64, 0.25, 0.25], [0.2f64, 0.6, 0.2], [0.25f64, 0.5, 0.25]);
        let row = |p: [f64; 3]| Tensor::from_vec(p.map(|x| x.ln() as f32).to_vec(), (1, 3), &Device::Cpu).unwrap();
        let q: Vec<f32> = (0..3).map(|i| (0.4 + beta * (pq[i] / rho[i]).ln()) as f32).collect();
        let q = Tensor::from_vec(q, (1, 3), &Device::Cpu).unwrap();
        let eq7 = policy_target_logp(&q, &row(rho), QReadout::Dueling, beta).unwrap();
        let probs = |t: Tensor| t.exp().unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let s2 = 2f64.sqrt();
        let half = [0.2 / s2, 0.6 * s2, 0.2];
        let half_sum: f64 = half.iter().sum();
        for (tau, want) in [
            // τ = 1: Eq. 7, π_Q itself.
            (1.0, pq),
            // τ = 0: π_k·π_Q/ρ = (0.1, 1.2, 0.2) / 1.5.
            (0.0, [0.1 / 1.5, 1.2 / 1.5, 0.2 / 1.5]),
            // τ = 1/2: π_Q·(π_k/ρ)^(1/2) = (0.2/√2, 0.6·√2, 0.2), normalised.
            (0.5, half.map(|x| x / half_sum)),
        ] {
            let got = probs(prior_mixed_target_logp(&eq7, &row(rho), &row(pk), tau).unwrap());
            for (g, w) in got.iter().zip(want) {
                assert!(close(*g as f64, w, 1e-5), "τ {tau}: {got:?} vs {want:?}");
            }
        }
        // Where Q sees no difference between tokens (π_Q = ρ), the target at τ = 0 is π_k.
        let flat = Tensor::new(&[[0.4f32, 0.4, 0.4]], &Device::Cpu).unwrap();
        let eq7 = policy_target_logp(&flat, &row(rho), QReadout::Dueling, beta).unwrap();
        let got = probs(prior_mixed_target_logp(&eq7, &row(rho), &row(pk), 0.0).unwrap());
        for (g, w) in got.iter().zip(pk) {
            assert!(close(*g as f64, w, 1e-5), "{got:?} vs {pk:?}");
        }
    }

    #[test]
    fn q_reference_kl_is_beta_times_the_kl_of_pi_q_to_rho() {
        // ρ = (0.5, 0.25, 0.25), π_Q = (0.2, 0.6, 0.2), V = 0.4, β = 0.1:
        // 0.1·(0.2·ln 0.4 + 0.6·ln 2.4 + 0.2·ln 0.8).
        let beta = 0.1f64;
        let (rho, pq) = ([0.5f64, 0.25, 0.25], [0.2f64, 0.6, 0.2]);
        let q: Vec<f32> = (0..3).map(|i| (0.4 + beta * (pq[i] / rho[i]).ln()) as f32).collect();
        let q = Tensor::from_vec(q, (1, 3), &Device::Cpu).unwrap();
        let ref_logp = Tensor::from_vec(rho.map(|r| r.ln() as f32).to_vec(), (1, 3), &Device::Cpu).unwrap();
        let got = q_reference_kl(&q, &ref_logp, beta).unwrap().to_vec1::<f32>().unwrap()[0] as f64;
        let want = beta * (0.2 * 0.4f64.ln() + 0.6 * 2.4f64.ln() + 0.2 * 0.8f64.ln());
        assert!(close(got, want, 1e-5), "{got} vs {want}");
        // Zero where Q sees no difference between tokens (π_Q = ρ).
        let flat = Tensor::new(&[[0.4f32, 0.4, 0.4]], &Device::Cpu).unwrap();
        assert!(q_reference_kl(&flat, &ref_logp, beta).unwrap().to_vec1::<f32>().unwrap()[0].abs() < 1e-6);
    }

    #[test]
    fn conservative_term_is_minus_beta_log_ratio_under_dueling() {
        // One row, vocabulary 3: ρ = (0.5, 0.25, 0.25), π_Q = (0.2, 0.6, 0.2), V = 0.4, β = 0.1.
        let beta = 0.1f64;
        let rho = [0.5f64, 0.25, 0.25];
        let pq = [0.2f64, 0.6, 0.2];
        let q: Vec<f32> = (0..3).map(|i| (0.4 + beta * (pq[i] / rho[i]).ln()) as f32).collect();
        let q = Tensor::from_vec(q, (1, 3), &Device::Cpu).unwrap();
        let ref_logp = Tensor::from_vec(rho.map(|r| r.ln() as f32).to_vec(), (1, 3), &Device::Cpu).unwrap();
        let taken = taken_values(&q, &Tensor::new(&[1u32], &Device::Cpu).unwrap()).unwrap();
        let c = conservative_term(&q, &taken, &ref_logp, beta).unwrap().to_vec1::<f32>().unwrap();
        let want = -beta * (0.6f64 / 0.25).ln();
        assert!(close(c[0] as f64, want, 1e-5), "{c:?} vs {want}");
    }

    #[test]
    fn the_dueling_shortcuts_equal_the_full_distribution_forms() {
        // Q-network logits, ρ, V and the taken tokens of two rows; β = 0.3. Each shortcut the
        // update takes must equal the definition over the full vocabulary.
        let ql = t(&[&[1.0, -0.5, 2.0, 0.1], &[0.0, 3.0, -1.0, 0.5]]);
        let rl = log_softmax(&t(&[&[0.2, 0.0, -0.3, 1.0], &[-2.0, 0.4, 0.0, 0.3]])).unwrap();
        let value = Tensor::new(&[0.7f32, -1.2], &Device::Cpu).unwrap();
        let tokens = Tensor::new(&[2u32, 0], &Device::Cpu).unwrap();
        let beta = 0.3;
        let q = q_values(&ql, Some(&value), &rl, QReadout::Dueling, beta).unwrap();
        let taken = taken_values(&q, &tokens).unwrap();
        let short = dueling_taken_values(
            &taken_values(&log_softmax(&ql).unwrap(), &tokens).unwrap(),
            &taken_values(&rl, &tokens).unwrap(),
            &value,
            beta,
        )
        .unwrap();
        for (a, b) in v1(&taken).iter().zip(v1(&short)) {
            assert!(close(*a as f64, b as f64, 1e-6), "taken {a} vs {b}");
        }
        let full = v1(&conservative_term(&q, &taken, &rl, beta).unwrap());
        for (a, b) in full.iter().zip(v1(&dueling_conservative_term(&value, &taken).unwrap())) {
            assert!(close(*a as f64, b as f64, 1e-5), "conservative {a} vs {b}");
        }
        for readout in [QReadout::Dueling, QReadout::Logits] {
            let q = q_values(&ql, Some(&value), &rl, readout, beta).unwrap();
            let want = policy_target_logp(&q, &rl, readout, beta).unwrap().to_vec2::<f32>().unwrap();
            let got = policy_target_from_q_logits(&ql, readout, beta).unwrap().to_vec2::<f32>().unwrap();
            for (a, b) in want.iter().flatten().zip(got.iter().flatten()) {
                assert!(close(*a as f64, *b as f64, 1e-5), "{readout:?} target {a} vs {b}");
            }
        }
        // By hand, the first row's taken token: 0.7 + 0.3·(log π_Q(2) − log ρ(2)).
        let lse = |x: &[f64]| x.iter().map(|v| v.exp()).sum::<f64>().ln();
        let want = 0.7 + beta * ((2.0 - lse(&[1.0, -0.5, 2.0, 0.1])) - (-0.3 - lse(&[0.2, 0.0, -0.3, 1.0])));
        assert!(close(v1(&short)[0] as f64, want, 1e-6), "{} vs {want}", v1(&short)[0]);
    }

    #[test]
    fn tree_backup_carries_what_followed_the_taken_token() {
        // Three tokens; Eq. 6 gives [V(c1), V(c2), r] = [0.2, 0.4, 1.0].
        let one = [0.2, 0.4, 1.0];
        let q = [9.0, 0.5, 0.7]; // Q̄ of the taken token at rows 1, 2 (row 0 unused)
        let p = [9.0, 0.5, 1.0]; // π of it
                                 // λ = 0: Eq. 6 unchanged.
        let mut t = one;
        tree_backup_targets(&mut t, &q, &p, 0.0, 1.0);
        assert_eq!(t, one);
        // λ = 1, f = 1: y2 = 0.4 + 1·1.0·(1.0 − 0.7) = 0.7; y1 = 0.2 + 1·0.5·(0.7 − 0.5) = 0.3.
        let mut t = one;
        tree_backup_targets(&mut t, &q, &p, 1.0, 1.0);
        assert!(close(t[1], 0.7, 1e-12) && close(t[0], 0.3, 1e-12) && t[2] == 1.0, "{t:?}");
        // λ = 0.5, f = 0.9: y2 = 0.4 + 0.45·0.3 = 0.535; y1 = 0.2 + 0.45·0.5·(0.535 − 0.5).
        let mut t = one;
        tree_backup_targets(&mut t, &q, &p, 0.5, 0.9);
        assert!(close(t[1], 0.535, 1e-12), "{t:?}");
        assert!(close(t[0], 0.2 + 0.225 * 0.035, 1e-12), "{t:?}");
        // One token: nothing to carry.
        let mut t = [1.5];
        tree_backup_targets(&mut t, &[0.0], &[1.0], 1.0, 1.0);
        assert_eq!(t, [1.5]);
    }

    #[test]
    fn q_loss_mse_and_huber() {
        let q = Tensor::new(&[1.0f32, 2.0, -3.0], &Device::Cpu).unwrap();
        let tg = Tensor::new(&[0.0f32, 2.5, 0.0], &Device::Cpu).unwrap();
        let mse = q_loss(&q, &tg, None).unwrap().to_scalar::<f32>().unwrap();
        assert!(close(mse as f64, (1.0 + 0.25 + 9.0) / 3.0, 1e-6));
        // δ = 1: d = 1 → 1; d = −0.5 → 0.25; d = −3 → 2·3 − 1 = 5.
        let hub = q_loss(&q, &tg, Some(1.0)).unwrap().to_scalar::<f32>().unwrap();
        assert!(close(hub as f64, (1.0 + 0.25 + 5.0) / 3.0, 1e-6));
        let idx = Tensor::new(&[1u32, 0], &Device::Cpu).unwrap();
        let rows = t(&[&[5.0, 6.0], &[7.0, 8.0]]);
        assert_eq!(v1(&taken_values(&rows, &idx).unwrap()), vec![6.0, 7.0]);
    }

    #[test]
    fn policy_loss_by_hand_and_its_gradient_reaches_only_the_policy() {
        let beta = 0.5;
        let rf = log_softmax(&t(&[&[0.0, 0.0]])).unwrap();
        let q = t(&[&[1.0, 0.0]]);
        // Logits read-out: target softmax(Q/β) = softmax(2, 0).
        let target = policy_target_logp(&q, &rf, QReadout::Logits, beta).unwrap();
        let p_t = (2f64.exp()) / (2f64.exp() + 1.0);
        let got = target.exp().unwrap().to_vec2::<f32>().unwrap();
        assert!(close(got[0][0] as f64, p_t, 1e-6));

        let var = candle_core::Var::from_tensor(&t(&[&[0.0, 0.0]])).unwrap();
        let kl = policy_kl_rows(var.as_tensor(), &target).unwrap().sum_all().unwrap();
        let want = 0.5 * (0.5 / p_t).ln() + 0.5 * (0.5 / (1.0 - p_t)).ln();
        assert!(close(kl.to_scalar::<f32>().unwrap() as f64, want, 1e-5));
        let grads = kl.backward().unwrap();
        let g = grads.get(var.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
        // d KL / d z_0 = π_0 (log π_0 − log t_0 − KL) = 0.5 (ln(0.5/p_t) − KL) < 0: raise z_0.
        let want_g0 = 0.5 * ((0.5 / p_t).ln() - want);
        assert!(close(g[0][0] as f64, want_g0, 1e-4), "{} vs {}", g[0][0], want_g0);
        assert!(close(g[0][1] as f64, -want_g0, 1e-4));
    }

    /// Appendix A, Eq. 13: with per-token values from the inside-action case of Eq. 6,
    /// `E_{w1~π}[Q(s,w1)] − β KL(w1|s) = E_{a~π}[Q(s,a)] − β KL(a|s)` with the action-level KL
    /// `Σ_a π(a) log(π(a)/ρ(a))`. Checked for arbitrary π, ρ and last-token Q on 3-token actions.
    #[test]
    fn eq13_token_and_action_level_agree() {
        let beta = 0.3;
        let vsz = 3usize;
        // Deterministic pseudo-random numbers.
        let mut state = 12345u64;
        let mut next = move || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((state >> 33) as f64 / (1u64 << 31) as f64) * 4.0 - 2.0
        };
        // Contexts by depth: 1 at depth 0, 3 at depth 1, 9 at depth 2.
        let mut logits = |n: usize| -> Tensor {
            let v: Vec<f32> = (0..n * vsz).map(|_| next() as f32).collect();
            Tensor::from_vec(v, (n, vsz), &Device::Cpu).unwrap()
        };
        let pol: Vec<Tensor> = (0..3).map(|d| log_softmax(&logits(vsz.pow(d))).unwrap()).collect();
        let rf: Vec<Tensor> = (0..3).map(|d| log_softmax(&logits(vsz.pow(d))).unwrap()).collect();
        // Q(s, w1, w2, w3) for all 27 actions, as 9 rows of 3.
        let q_last = logits(9);
        // Backward recursion with soft_values: Q(s,w1,w2) = V(s,w1,w2); Q(s,w1) = V(s,w1).
        let q2 = soft_values(&pol[2], &q_last, &rf[2], beta).unwrap().reshape((3, 3)).unwrap();
        let q1 = soft_values(&pol[1], &q2, &rf[1], beta).unwrap().reshape((1, 3)).unwrap();
        let lhs = soft_values(&pol[0], &q1, &rf[0], beta).unwrap().to_vec1::<f32>().unwrap()[0] as f64;

        // Brute force over the 27 actions.
        let p: Vec<Vec<Vec<f32>>> = pol.iter().map(|x| x.to_vec2::<f32>().unwrap()).collect();
        let r: Vec<Vec<Vec<f32>>> = rf.iter().map(|x| x.to_vec2::<f32>().unwrap()).collect();
        let ql = q_last.to_vec2::<f32>().unwrap();
        let (mut eq, mut kl) = (0.0f64, 0.0f64);
        for a in 0..vsz {
            for b in 0..vsz {
                for c in 0..vsz {
                    let lp = p[0][0][a] as f64 + p[1][a][b] as f64 + p[2][a * vsz + b][c] as f64;
                    let lr = r[0][0][a] as f64 + r[1][a][b] as f64 + r[2][a * vsz + b][c] as f64;
                    let pa = lp.exp();
                    eq += pa * ql[a * vsz + b][c] as f64;
                    kl += pa * (lp - lr);
                }
            }
        }
        let rhs = eq - beta * kl;
        assert!(close(lhs, rhs, 1e-5), "token level {lhs} vs action level {rhs}");
    }
}
