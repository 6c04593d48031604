//! Where a run's time goes, per stage.
//!
//! Stages run on several threads at once (reading ahead, calibrating one block ahead, writing
//! behind), so their busy times add up to more than the wall clock; the difference is the
//! overlap. The main thread's waits on the reader and the writer are stages too (`read wait`,
//! `write wait`): the wall clock less those waits and the serial output finish is the run's time
//! with I/O excluded.
//!
//! GPU work is asynchronous: without [`Profile::exact`], a GPU stage's time is the host's time to
//! record and submit it, and the wait lands in whatever stage reads results next. `--profile`
//! makes the calibration wait for the device at each stage boundary, which attributes the time
//! correctly at a small cost in overlap.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Stage names, in the order a report lists them (`factor ahead`: the GPTQ factors a search
/// will use, built on the calibration thread with each block's Grams).
pub const STAGES: [&str; 13] = [
    "probe",
    "read",
    "read wait",
    "embed",
    "forward",
    "gram",
    "factor ahead",
    "calibration wait",
    "quantize",
    "write",
    "write wait",
    "evaluate",
    "finish",
];

/// Parts of the `quantize` stage, timed inside the algorithm through [`record`] and listed after
/// the stages: the damped Gram, the visiting order and the GPTQ factor of a layer (`prepare`, and
/// `prepare beside` for the other dampings a search builds on a helper thread), a search's
/// candidate runs (`candidates`, which include their scoring) and the scoring of candidates on
/// held-out images (`scoring`). The indented parts split those further by the step that runs:
/// the line search's start per layer (`start`), each candidate's grid (`grids`), round-to-nearest, exact residual refreshes, losses without a residual (an RTN candidate's),
/// GPTQ passes, sweeps and `‖W − Q̂‖²` reductions
/// inside the runs; the energy `‖X·Wᵀ‖²` and the state's upload per layer; the order, the damped
/// copy of `G` and the factor inside each preparation (on whichever thread builds it), and the
/// factor a GPU builds from its resident `G` at a run's GPTQ start (`factor on device`: each
/// call, a build or a look at the one it keeps). On a GPU
/// the steps are queued, so a step that reads a result back (a refresh's loss, a reduction)
/// also holds the queued work before it.
pub const QUANTIZE_PARTS: [&str; 18] = [
    "  prepare",
    "  prepare beside",
    "  candidates",
    "  scoring",
    "    start",
    "    grids",
    "    rtn",
    "    refresh",
    "    loss",
    "    gptq",
    "    sweep",
    "    sqnorm",
    "    energy",
    "    upload",
    "    order",
    "    damped",
    "    factor",
    "    factor on device",
];

thread_local! {
    static CURRENT: RefCell<Option<Arc<Profile>>> = const { RefCell::new(None) };
}

/// Runs `f` with `profile` receiving, on this thread, what [`record`] times (the algorithm has
/// no profile of its own to pass around).
pub fn with_current<T>(profile: &Arc<Profile>, f: impl FnOnce() -> T) -> T {
    let before = CURRENT.with(|c| c.replace(Some(profile.clone())));
    let out = f();
    CURRENT.with(|c| *c.borrow_mut() = before);
    out
}

/// This thread's current profile, to hand to a helper thread with [`with_current`].
pub fn current() -> Option<Arc<Profile>> {
    CURRENT.with(|c| c.borrow().clone())
}

/// Times `f` as `part` (one of [`QUANTIZE_PARTS`]) in this thread's current profile, if any.
pub fn record<T>(part: &'static str, f: impl FnOnce() -> T) -> T {
    let current = CURRENT.with(|c| c.borrow().clone());
    match current {
        Some(p) => p.time(part, f),
        None => f(),
    }
}

/// Busy time per stage, shared by the threads of a run.
#[derive(Debug, Default)]
pub struct Profile {
    exact: bool,
    stages: Mutex<BTreeMap<&'static str, (f64, u64)>>,
}

/// One stage's total.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct StageTime {
    /// The stage.
    pub stage: String,
    /// Busy seconds, summed over calls (and threads).
    pub seconds: f64,
    /// Calls.
    pub calls: u64,
}

/// The profile of a run, as reported.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct ProfileReport {
    /// Wall-clock seconds of the whole run.
    pub wall_seconds: f64,
    /// Wall clock less the main thread's waits on reading and writing and the serial finish of
    /// the outputs (shard renames, hashes): the run with I/O excluded.
    pub wall_seconds_without_io: f64,
    /// Whether GPU stages were synchronised at their boundaries (`--profile`).
    pub exact: bool,
    /// Per stage, in pipeline order.
    pub stages: Vec<StageTime>,
    /// Bytes uploaded to the GPU over the run (data transfers; `None` on the CPU).
    #[serde(default)]
    pub device_bytes_up: Option<u64>,
    /// Bytes read back from the GPU over the run.
    #[serde(default)]
    pub device_bytes_down: Option<u64>,
}

impl Profile {
    /// An empty profile; `exact` asks GPU stages to wait for the device at their ends.
    pub fn new(exact: bool) -> Profile {
        Profile {
            exact,
            stages: Mutex::new(BTreeMap::new()),
        }
    }

    /// Whether GPU stages should be synchronised.
    pub fn exact(&self) -> bool {
        self.exact
    }

    /// Adds `seconds` to `stage`.
    pub fn add(&self, stage: &'static str, seconds: f64) {
        let mut m = self.stages.lock().unwrap_or_else(|e| e.into_inner());
        let e = m.entry(stage).or_insert((0.0, 0));
        e.0 += seconds;
        e.1 += 1;
    }

    /// Runs `f`, adding its time to `stage`.
    pub fn time<T>(&self, stage: &'static str, f: impl FnOnce() -> T) -> T {
        let t = Instant::now();
        let out = f();
        self.add(stage, t.elapsed().as_secs_f64());
        out
    }

    /// Seconds of `stage` so far.
    pub fn seconds(&self, stage: &str) -> f64 {
        let m = self.stages.lock().unwrap_or_else(|e| e.into_inner());
        m.get(stage).map_or(0.0, |e| e.0)
    }

    /// The report for a run of `wall_seconds`.
    pub fn report(&self, wall_seconds: f64) -> ProfileReport {
        let m = self.stages.lock().unwrap_or_else(|e| e.into_inner());
        let stages: Vec<StageTime> = STAGES
            .iter()
            .chain(&QUANTIZE_PARTS)
            .filter_map(|s| {
                m.get(s).map(|e| StageTime {
                    stage: s.to_string(),
                    seconds: e.0,
                    calls: e.1,
                })
            })
            .collect();
        let waits: f64 = ["read wait", "write wait", "finish"]
            .iter()
            .filter_map(|s| m.get(s).map(|e| e.0))
            .sum();
        ProfileReport {
            wall_seconds,
            wall_seconds_without_io: (wall_seconds - waits).max(0.0),
            exact: self.exact,
            stages,
            device_bytes_up: None,
            device_bytes_down: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_sum_per_name_and_waits_leave_the_io_free_wall_clock() {
        let p = Profile::new(false);
        p.add("gram", 1.0);
        p.add("gram", 0.5);
        p.add("read wait", 0.25);
        p.add("write wait", 0.25);
        p.add("finish", 1.0);
        p.add("read", 3.0);
        let r = p.report(10.0);
        assert_eq!(r.stages[0].stage, "read");
        assert!(STAGES
            .iter()
            .all(|s| STAGES.iter().filter(|t| *t == s).count() == 1));
        let g = r.stages.iter().find(|s| s.stage == "gram").unwrap();
        assert_eq!((g.seconds, g.calls), (1.5, 2));
        // Reading on the reader thread overlaps; only the main thread's waits come off.
        assert_eq!(r.wall_seconds_without_io, 8.5);
        assert_eq!(p.time("quantize", || 7), 7);
        assert_eq!(p.report(1.0).stages.len(), 6);
    }

    #[test]
    fn parts_are_recorded_only_inside_with_current_and_on_its_thread() {
        let p = Arc::new(Profile::new(false));
        assert_eq!(record("  prepare", || 7), 7);
        assert_eq!(p.report(1.0).stages.len(), 0);
        with_current(&p, || {
            record("  prepare", || ());
            record("  scoring", || ());
            // Another thread has no current profile.
            std::thread::scope(|s| {
                s.spawn(|| record("  candidates", || ()));
            });
        });
        record("  prepare", || ());
        let names: Vec<String> = p.report(1.0).stages.into_iter().map(|s| s.stage).collect();
        assert_eq!(names, ["  prepare", "  scoring"]);
        assert_eq!(p.report(1.0).stages[0].calls, 1);
    }
}
