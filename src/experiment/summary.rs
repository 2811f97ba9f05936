//! Per spec and seed statistics of a run, and `summary.csv` / `summary.md` (the layout of the
//! paper's Table 2: best reward within k steps, mean ± std over seeds).

use std::fmt::Write as _;
use std::path::Path;

use super::record::StepRecord;
use super::ExperimentError;

/// Statistics of one spec and seed.
#[derive(Debug, Clone, PartialEq)]
pub struct SeedStats {
    pub seed: u64,
    /// Environment steps taken.
    pub steps: u32,
    /// Actions that ran.
    pub ran: u32,
    /// Episodes started.
    pub episodes: u32,
    /// Sum of all rewards (failures count with the failure reward).
    pub reward_sum: f64,
    /// Sum of the rewards of the actions that ran.
    pub ran_reward_sum: f64,
    /// Best reward so far after each environment step: `best_curve[t]` is the best of steps 1..=t+1.
    pub best_curve: Vec<f64>,
    /// Each step's reward and whether its action ran, in order.
    pub outcomes: Vec<(f64, bool)>,
}

impl SeedStats {
    /// Empty statistics for `seed`.
    pub fn new(seed: u64) -> SeedStats {
        SeedStats {
            seed,
            steps: 0,
            ran: 0,
            episodes: 0,
            reward_sum: 0.0,
            ran_reward_sum: 0.0,
            best_curve: Vec::new(),
            outcomes: Vec::new(),
        }
    }

    /// Adds one step.
    pub fn push(&mut self, record: &StepRecord) {
        self.steps += 1;
        if record.step == 0 {
            self.episodes += 1;
        }
        self.reward_sum += record.reward;
        if record.ran {
            self.ran += 1;
            self.ran_reward_sum += record.reward;
        }
        let best = self.best().map_or(record.reward, |b| b.max(record.reward));
        self.best_curve.push(best);
        self.outcomes.push((record.reward, record.ran));
    }

    /// The outcomes of the first (`late = false`) or last `len` steps; `None` when `len` is 0
    /// or more than the steps taken.
    pub fn window(&self, len: usize, late: bool) -> Option<&[(f64, bool)]> {
        let o = &self.outcomes;
        if len == 0 || o.len() < len {
            return None;
        }
        Some(if late { &o[o.len() - len..] } else { &o[..len] })
    }

    /// Best reward found, `None` before the first step.
    pub fn best(&self) -> Option<f64> {
        self.best_curve.last().copied()
    }

    /// Actions that ran / actions taken.
    pub fn runnable_rate(&self) -> Option<f64> {
        (self.steps > 0).then(|| f64::from(self.ran) / f64::from(self.steps))
    }

    /// Mean reward over all actions taken.
    pub fn mean_reward(&self) -> Option<f64> {
        (self.steps > 0).then(|| self.reward_sum / f64::from(self.steps))
    }

    /// Mean reward over the actions that ran.
    pub fn mean_ran_reward(&self) -> Option<f64> {
        (self.ran > 0).then(|| self.ran_reward_sum / f64::from(self.ran))
    }
}

/// Statistics of one spec over its seeds.
#[derive(Debug, Clone, PartialEq)]
pub struct SpecStats {
    pub spec: String,
    /// The budget: environment steps per seed (the paper's k).
    pub k: u32,
    pub seeds: Vec<SeedStats>,
}

impl SpecStats {
    /// Empty statistics for `spec` with the given seeds and budget `k`.
    pub fn new(spec: &str, seeds: &[u64], k: u32) -> SpecStats {
        SpecStats { spec: spec.to_string(), k, seeds: seeds.iter().map(|&s| SeedStats::new(s)).collect() }
    }

    /// Mean and sample standard deviation (n − 1; `None` for a single seed) of the best reward
    /// over the seeds that took at least one step.
    pub fn best_mean_std(&self) -> Option<(f64, Option<f64>)> {
        let bests: Vec<f64> = self.seeds.iter().filter_map(SeedStats::best).collect();
        mean_std(&bests)
    }

    /// Runnable rate over all steps of all seeds.
    pub fn runnable_rate(&self) -> Option<f64> {
        let steps: u32 = self.seeds.iter().map(|s| s.steps).sum();
        let ran: u32 = self.seeds.iter().map(|s| s.ran).sum();
        (steps > 0).then(|| f64::from(ran) / f64::from(steps))
    }

    /// Mean reward over all steps of all seeds.
    pub fn mean_reward(&self) -> Option<f64> {
        let steps: u32 = self.seeds.iter().map(|s| s.steps).sum();
        let sum: f64 = self.seeds.iter().map(|s| s.reward_sum).sum();
        (steps > 0).then(|| sum / f64::from(steps))
    }

    /// Mean reward over the actions that ran, all seeds.
    pub fn mean_ran_reward(&self) -> Option<f64> {
        let ran: u32 = self.seeds.iter().map(|s| s.ran).sum();
        let sum: f64 = self.seeds.iter().map(|s| s.ran_reward_sum).sum();
        (ran > 0).then(|| sum / f64::from(ran))
    }

    /// Total steps over all seeds.
    pub fn steps(&self) -> u32 {
        self.seeds.iter().map(|s| s.steps).sum()
    }

    /// The length of the early and late windows of [`SpecStats::window`]: a quarter of the
    /// shortest seed's steps, at most 64 (the "first and last 64 steps" of 256).
    pub fn window_len(&self) -> usize {
        let shortest = self.seeds.iter().map(|s| s.outcomes.len()).min().unwrap_or(0);
        (shortest / 4).min(64)
    }

    /// Runnable rate and mean reward over the first (`late = false`) or last `len` steps of
    /// every seed, pooled; `None` when `len` is 0.
    pub fn window(&self, len: usize, late: bool) -> Option<(f64, f64)> {
        if len == 0 {
            return None;
        }
        let mut picked = Vec::new();
        for s in &self.seeds {
            picked.extend_from_slice(s.window(len, late)?);
        }
        let n = picked.len() as f64;
        let ran = picked.iter().filter(|(_, ran)| *ran).count() as f64;
        Some((ran / n, picked.iter().map(|(r, _)| r).sum::<f64>() / n))
    }

    /// The mean over seeds of the best reward after `t` steps (`t` from 1), counting only seeds
    /// that took `t` steps; `None` when none did.
    pub fn mean_best_at(&self, t: usize) -> Option<f64> {
        let values: Vec<f64> = self.seeds.iter().filter_map(|s| s.best_curve.get(t - 1).copied()).collect();
        mean_std(&values).map(|(m, _)| m)
    }
}

/// Statistics of a run from its step records: one entry per `(spec name, seeds, k)`, in that
/// order. Records of other specs or seeds are not counted.
pub fn stats_from_records(specs: &[(String, Vec<u64>, u32)], records: &[StepRecord]) -> Vec<SpecStats> {
    let mut stats: Vec<SpecStats> = specs.iter().map(|(name, seeds, k)| SpecStats::new(name, seeds, *k)).collect();
    for record in records {
        let seed = stats
            .iter_mut()
            .find(|s| s.spec == record.spec)
            .and_then(|s| s.seeds.iter_mut().find(|s| s.seed == record.seed));
        if let Some(seed) = seed {
            seed.push(record);
        }
    }
    stats
}

/// Mean and sample standard deviation (n − 1); the deviation is `None` for one value.
pub fn mean_std(values: &[f64]) -> Option<(f64, Option<f64>)> {
    if values.is_empty() {
        return None;
    }
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let std =
        (values.len() > 1).then(|| (values.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / (n - 1.0)).sqrt());
    Some((mean, std))
}

fn num(v: Option<f64>) -> String {
    v.map_or_else(String::new, |v| format!("{v:.4}"))
}

fn pct(v: Option<f64>) -> String {
    v.map_or_else(|| "–".to_string(), |v| format!("{:.0}%", v * 100.0))
}

fn md_num(v: Option<f64>) -> String {
    v.map_or_else(|| "–".to_string(), |v| format!("{v:.4}"))
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// `summary.csv`: one row per spec and seed, then one row per spec with `seed` = `all` whose
/// `best_reward` is the mean over seeds and `best_reward_std` the sample standard deviation;
/// `k` is the step budget per seed.
pub fn to_csv(stats: &[SpecStats]) -> String {
    let mut out = String::from(
        "spec,seed,steps,episodes,ran,runnable_rate,mean_reward,mean_reward_ran,best_reward,best_reward_std,k\n",
    );
    for spec in stats {
        for s in &spec.seeds {
            let _ = writeln!(
                out,
                "{},{},{},{},{},{},{},{},{},,{}",
                csv_field(&spec.spec),
                s.seed,
                s.steps,
                s.episodes,
                s.ran,
                num(s.runnable_rate()),
                num(s.mean_reward()),
                num(s.mean_ran_reward()),
                num(s.best()),
                spec.k,
            );
        }
        let (best, std) = spec.best_mean_std().map_or((None, None), |(m, s)| (Some(m), s));
        let _ = writeln!(
            out,
            "{},all,{},{},{},{},{},{},{},{},{}",
            csv_field(&spec.spec),
            spec.steps(),
            spec.seeds.iter().map(|s| s.episodes).sum::<u32>(),
            spec.seeds.iter().map(|s| s.ran).sum::<u32>(),
            num(spec.runnable_rate()),
            num(spec.mean_reward()),
            num(spec.mean_ran_reward()),
            num(best),
            num(std),
            spec.k,
        );
    }
    out
}

/// `summary.md`: the Table 2 layout (one row per spec, best reward within k steps as
/// mean ± std over seeds) with the runnable rate and mean reward beside it, then per-seed detail.
pub fn to_markdown(stats: &[SpecStats], algo: &str) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "# Results: {algo}\n");
    let _ = writeln!(
        out,
        "Best reward (ROC AUC on the validation split; for text games, a step's reward) found within k \
         environment steps per seed, mean ± standard deviation over seeds (sample std, n − 1). Runnable \
         rate = actions that ran (games: that the game played without failing) / actions taken; mean \
         reward counts failed actions with the spec's failure reward.\n"
    );
    let _ =
        writeln!(out, "| Spec | k | {algo}: best reward | Runnable rate | Mean reward | Mean reward (ran) | Steps |");
    let _ = writeln!(out, "|---|---|---|---|---|---|---|");
    for spec in stats {
        let best = match spec.best_mean_std() {
            None => "–".to_string(),
            Some((m, Some(s))) => format!("{m:.4} ± {s:.4}"),
            Some((m, None)) => format!("{m:.4}"),
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} |",
            spec.spec,
            spec.k,
            best,
            pct(spec.runnable_rate()),
            md_num(spec.mean_reward()),
            md_num(spec.mean_ran_reward()),
            spec.steps()
        );
    }
    let _ = writeln!(out, "\n## First and last steps\n");
    let _ = writeln!(
        out,
        "Runnable rate and mean reward over each seed's first and last w steps (w = a quarter of the \
         steps, at most 64): whether the policy improved during the run.\n"
    );
    let _ = writeln!(
        out,
        "| Spec | w | First w: runnable | First w: mean reward | Last w: runnable | Last w: mean reward |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|");
    for spec in stats {
        let w = spec.window_len();
        let (first, last) = (spec.window(w, false), spec.window(w, true));
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} |",
            spec.spec,
            w,
            pct(first.map(|x| x.0)),
            md_num(first.map(|x| x.1)),
            pct(last.map(|x| x.0)),
            md_num(last.map(|x| x.1))
        );
    }
    let _ = writeln!(out, "\n## Per seed\n");
    let _ = writeln!(
        out,
        "| Spec | Seed | Steps | Episodes | Ran | Runnable rate | Mean reward | Mean reward (ran) | Best reward |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|");
    for spec in stats {
        for s in &spec.seeds {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                spec.spec,
                s.seed,
                s.steps,
                s.episodes,
                s.ran,
                pct(s.runnable_rate()),
                md_num(s.mean_reward()),
                md_num(s.mean_ran_reward()),
                md_num(s.best())
            );
        }
    }
    out
}

/// Writes `text` to `path` atomically (temporary file in the same folder, then rename), so a
/// reader never sees half a summary.
pub fn write_atomic(path: &Path, text: &[u8]) -> Result<(), ExperimentError> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).map_err(|e| ExperimentError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| ExperimentError::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(step: u32, reward: f64, ran: bool) -> StepRecord {
        StepRecord {
            spec: "x".into(),
            seed: 0,
            member: 0,
            episode: 0,
            step,
            env_step: 0,
            prompt_sha256: String::new(),
            generation: String::new(),
            action: String::new(),
            reward,
            ran,
            terminated: ran,
            truncated: false,
            error: String::new(),
            wall_s: 0.0,
            cpu_s: 0.0,
            peak_rss_mb: 0.0,
            gen_s: 0.0,
        }
    }

    #[test]
    fn seed_stats_by_hand() {
        let mut s = SeedStats::new(3);
        for r in [rec(0, -1.0, false), rec(1, 0.5, true), rec(0, 0.75, true), rec(0, -1.0, false)] {
            s.push(&r);
        }
        assert_eq!(s.best_curve, vec![-1.0, 0.5, 0.75, 0.75]);
        assert_eq!(s.episodes, 3);
        assert_eq!(s.runnable_rate(), Some(0.5));
        // (-1 + 0.5 + 0.75 - 1) / 4 = -0.1875
        assert_eq!(s.mean_reward(), Some(-0.1875));
        assert_eq!(s.mean_ran_reward(), Some(0.625));
    }

    #[test]
    fn mean_and_sample_std() {
        // mean 2, squared deviations 1 + 0 + 1 = 2, / (3 - 1) = 1
        assert_eq!(mean_std(&[1.0, 2.0, 3.0]), Some((2.0, Some(1.0))));
        assert_eq!(mean_std(&[0.5]), Some((0.5, None)));
        assert_eq!(mean_std(&[]), None);
    }

    #[test]
    fn spec_rows_in_csv_and_markdown() {
        let mut spec = SpecStats::new("balance, scale", &[0, 1], 5);
        spec.seeds[0].push(&rec(0, 0.5, true));
        spec.seeds[1].push(&rec(0, -1.0, false));
        spec.seeds[1].push(&rec(1, 0.7, true));
        let csv = to_csv(std::slice::from_ref(&spec));
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(lines.len(), 4);
        assert_eq!(lines[1], "\"balance, scale\",0,1,1,1,1.0000,0.5000,0.5000,0.5000,,5");
        // best: 0.5 and 0.7 -> mean 0.6, std sqrt(0.02) = 0.1414
        assert_eq!(lines[3], "\"balance, scale\",all,3,2,2,0.6667,0.0667,0.6000,0.6000,0.1414,5");
        let md = to_markdown(&[spec], "reflection");
        assert!(md.contains("| balance, scale | 5 | 0.6000 ± 0.1414 | 67% | 0.0667 | 0.6000 | 3 |"), "{md}");
        assert_eq!(SpecStats::new("y", &[0], 1).best_mean_std(), None);
    }

    #[test]
    fn mean_best_curve_counts_only_seeds_that_got_there() {
        let mut spec = SpecStats::new("x", &[0, 1], 3);
        spec.seeds[0].push(&rec(0, 0.2, true));
        spec.seeds[0].push(&rec(0, 0.4, true));
        spec.seeds[1].push(&rec(0, 0.6, true));
        assert!((spec.mean_best_at(1).unwrap() - 0.4).abs() < 1e-12);
        assert_eq!(spec.mean_best_at(2), Some(0.4));
        assert_eq!(spec.mean_best_at(3), None);
    }

    #[test]
    fn first_and_last_windows_by_hand() {
        let mut spec = SpecStats::new("x", &[0, 1], 8);
        // Seed 0: 8 steps, fail, fail, then runs of 0.5 and a last 0.9; seed 1: 9 steps.
        for r in [-1.0, -1.0, 0.5, 0.5, 0.5, 0.5, 0.5, 0.9] {
            spec.seeds[0].push(&rec(0, r, r > 0.0));
        }
        for r in [0.5, -1.0, 0.5, 0.5, 0.5, 0.5, 0.5, -1.0, 0.7] {
            spec.seeds[1].push(&rec(0, r, r > 0.0));
        }
        // A quarter of the shortest seed (8 steps): 2.
        assert_eq!(spec.window_len(), 2);
        // First 2: (-1, -1) and (0.5, -1): 1 of 4 ran, mean -2.5 / 4.
        assert_eq!(spec.window(2, false), Some((0.25, -0.625)));
        // Last 2: (0.5, 0.9) and (-1, 0.7): 3 of 4 ran, mean 1.1 / 4.
        let (ran, mean) = spec.window(2, true).unwrap();
        assert_eq!(ran, 0.75);
        assert!((mean - 0.275).abs() < 1e-12);
        assert_eq!(spec.window(0, true), None);
        let md = to_markdown(&[spec], "etpo");
        assert!(md.contains("| x | 2 | 25% | -0.6250 | 75% | 0.2750 |"), "{md}");
        assert_eq!(SpecStats::new("y", &[0], 1).window_len(), 0);
    }
}
