//! A linearizability checker for a map of registers with compare-and-swap: the objects a
//! client creates, reads, updates with a `resourceVersion` precondition and deletes.
//!
//! A history is a list of [`Op`]s, each with the time it was invoked and the time it
//! completed. Linearizability is compositional (Herlihy & Wing): the whole history is
//! linearizable exactly when each key's sub-history is, so each key is checked alone. For
//! one key the search is Wing & Gong's, with Lowe's cache of (linearized set, state)
//! pairs already explored (as Knossos and porcupine do): take the earliest pending call
//! that the model accepts, linearize it, start again from the front; when a return is
//! reached whose call is not linearized yet, undo the last choice.
//!
//! A call whose outcome is unknown (no answer, a timeout, a 5xx that does not say whether
//! it was applied) never completes: it may take effect at any point after its invocation,
//! or never, so the search may leave it out. Each such call multiplies the orders to
//! try, so a history should spread its calls over many keys with short lives (as Jepsen's
//! independent keys do). The model is nondeterministic where the history cannot tell (a
//! value written by such a call has a `resourceVersion` nobody saw), and the search runs
//! over sets of possible states.
//!
//! Values are unique per write, so a write applied twice shows as a read of a value
//! whose write was answered as failed, and a lost write as a read that no order explains.

use std::collections::HashSet;
use std::fmt;

/// A value written: unique per write in the history.
pub type Value = u64;
/// A resource version, as the server assigned it.
pub type Rv = u64;

/// What a client asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Call {
    /// Create the key with this value; fails when it exists.
    Create(Value),
    Get,
    /// Replace the value if the key's resource version is still `expect`.
    Update {
        value: Value,
        expect: Rv,
    },
    /// Delete the key, whatever its version.
    Delete,
}

/// What the client was told.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Outcome {
    Created(Rv),
    /// The create found the key there.
    Exists,
    Found(Value, Rv),
    NotFound,
    Updated(Rv),
    /// The update's `expect` was not the key's version.
    Conflict,
    Deleted,
    /// No answer that says whether the call took effect.
    Unknown,
}

/// One call with its outcome and times (nanoseconds since the history began).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Op {
    pub client: usize,
    pub key: String,
    pub call: Call,
    pub outcome: Outcome,
    pub invoked: u64,
    /// `None` when the outcome is [`Outcome::Unknown`]: the call may still take effect.
    pub completed: Option<u64>,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = |ns: u64| ns as f64 / 1e6;
        let done = match self.completed {
            Some(t) => format!("{:>10.1}", ms(t)),
            None => format!("{:>10}", "never"),
        };
        write!(
            f,
            "client {:>2} {:>10.1} ms → {done} ms  {:<8} {:?} → {:?}",
            self.client,
            ms(self.invoked),
            self.key,
            self.call,
            self.outcome
        )
    }
}

/// One key's register as the model sees it; `None` fields are not known (a write whose
/// answer was lost, or the state before a sub-history begins).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Reg {
    Absent,
    Present {
        value: Option<Value>,
        rv: Option<Rv>,
    },
}

/// Every state `reg` may move to when `call` is linearized with `outcome`; empty when
/// the outcome is impossible in `reg`. A call of unknown outcome is linearized only where
/// it takes effect: one that did not is simply never linearized (see [`search`]), and a
/// read of unknown outcome tells nothing.
fn step(reg: Reg, call: Call, outcome: Outcome) -> Vec<Reg> {
    use Call as C;
    use Outcome as O;
    let present = |value, rv| Reg::Present {
        value: Some(value),
        rv,
    };
    let version_is = |reg: Reg, want: Rv| match reg {
        Reg::Present { rv, .. } => rv.is_none_or(|r| r == want),
        Reg::Absent => false,
    };
    match (call, outcome, reg) {
        (C::Create(v), O::Created(rv), Reg::Absent) => vec![present(v, Some(rv))],
        (C::Create(_), O::Exists, r @ Reg::Present { .. }) => vec![r],
        (C::Create(v), O::Unknown, Reg::Absent) => vec![present(v, None)],
        (C::Get, O::Found(v, rv), Reg::Present { value, rv: have }) => {
            let same = value.is_none_or(|x| x == v) && have.is_none_or(|x| x == rv);
            if same {
                vec![present(v, Some(rv))]
            } else {
                vec![]
            }
        }
        (C::Get, O::NotFound, Reg::Absent) => vec![Reg::Absent],
        (C::Update { value, expect }, O::Updated(rv), r) if version_is(r, expect) => {
            vec![present(value, Some(rv))]
        }
        (C::Update { expect, .. }, O::Conflict, r @ Reg::Present { rv, .. }) => {
            if rv == Some(expect) {
                vec![]
            } else {
                vec![r]
            }
        }
        (C::Update { .. }, O::NotFound, Reg::Absent) => vec![Reg::Absent],
        (C::Update { value, expect }, O::Unknown, r) if version_is(r, expect) => {
            vec![present(value, None)]
        }
        (C::Delete, O::Deleted, Reg::Present { .. }) => vec![Reg::Absent],
        (C::Delete, O::NotFound, Reg::Absent) => vec![Reg::Absent],
        (C::Delete, O::Unknown, Reg::Present { .. }) => vec![Reg::Absent],
        _ => vec![],
    }
}

/// The set of states after `op`, from any of `states` (sorted, no duplicates).
fn step_all(states: &[Reg], op: &Op) -> Vec<Reg> {
    let mut out: Vec<Reg> = states
        .iter()
        .flat_map(|r| step(*r, op.call, op.outcome))
        .collect();
    out.sort();
    out.dedup();
    out
}

/// How one key's sub-history came out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyVerdict {
    Linearizable,
    /// No order explains it; `stuck` is the first op (by completion) that no order of
    /// the longest explained prefix could place, `window` a short failing sub-history
    /// ending with it (checked from an unknown starting state).
    Violation {
        stuck: Op,
        window: Vec<Op>,
    },
    /// The search ran out of its step budget.
    Undecided,
}

/// The verdict on a whole history.
#[derive(Debug, Clone)]
pub struct Report {
    pub keys: usize,
    pub ops: usize,
    /// Keys with a violation or no decision, with the verdict.
    pub problems: Vec<(String, KeyVerdict)>,
}

impl Report {
    pub fn linearizable(&self) -> bool {
        self.problems.is_empty()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.problems.is_empty() {
            return write!(f, "{} ops on {} keys: linearizable", self.ops, self.keys);
        }
        writeln!(
            f,
            "{} ops on {} keys: NOT linearizable",
            self.ops, self.keys
        )?;
        for (key, verdict) in &self.problems {
            match verdict {
                KeyVerdict::Violation { stuck, window } => {
                    writeln!(f, "key {key}: no order explains\n  {stuck}")?;
                    writeln!(f, "  shortest failing sub-history ({} ops):", window.len())?;
                    for op in window {
                        writeln!(f, "    {op}")?;
                    }
                }
                KeyVerdict::Undecided => writeln!(f, "key {key}: undecided (search budget)")?,
                KeyVerdict::Linearizable => {}
            }
        }
        Ok(())
    }
}

/// Search steps allowed per key before giving up as [`KeyVerdict::Undecided`].
const BUDGET: u64 = 20_000_000;

/// Check a whole history; every key starts absent.
pub fn check(history: &[Op]) -> Report {
    let mut keys: Vec<&str> = history.iter().map(|o| o.key.as_str()).collect();
    keys.sort_unstable();
    keys.dedup();
    let mut problems = Vec::new();
    for key in &keys {
        let ops: Vec<Op> = history.iter().filter(|o| o.key == *key).cloned().collect();
        let verdict = check_key(&ops, &[Reg::Absent]);
        if verdict != KeyVerdict::Linearizable {
            problems.push((key.to_string(), verdict));
        }
    }
    Report {
        keys: keys.len(),
        ops: history.len(),
        problems,
    }
}

/// The outcome of one search.
enum Search {
    Linearizable,
    /// The ops (by index) linearized in the deepest attempt.
    Stuck(Vec<bool>),
    OutOfBudget,
}

/// Check one key's ops from `init`, and on a violation find a short failing window.
fn check_key(ops: &[Op], init: &[Reg]) -> KeyVerdict {
    match search(ops, init) {
        Search::Linearizable => KeyVerdict::Linearizable,
        Search::OutOfBudget => KeyVerdict::Undecided,
        Search::Stuck(deepest) => {
            let stuck = ops
                .iter()
                .zip(&deepest)
                .filter(|(o, done)| !**done && o.completed.is_some())
                .min_by_key(|(o, _)| o.completed)
                .map(|(o, _)| o.clone())
                .unwrap_or_else(|| ops[0].clone());
            let window = shortest_window(ops, &stuck);
            KeyVerdict::Violation { stuck, window }
        }
    }
}

/// A short sub-history that still fails from an unknown start: the ops invoked before
/// `stuck` completed, then as few of the oldest as a binary search can drop.
fn shortest_window(ops: &[Op], stuck: &Op) -> Vec<Op> {
    let any = [
        Reg::Absent,
        Reg::Present {
            value: None,
            rv: None,
        },
    ];
    let fails = |w: &[Op]| matches!(search(w, &any), Search::Stuck(_));
    let end = stuck.completed.unwrap_or(u64::MAX);
    let mut sorted: Vec<Op> = ops.iter().filter(|o| o.invoked <= end).cloned().collect();
    sorted.sort_by_key(|o| o.invoked);
    if !fails(&sorted) {
        let mut all = ops.to_vec();
        all.sort_by_key(|o| o.invoked);
        return all;
    }
    // the largest start that still fails (a failing window shrinks from the left)
    let (mut good, mut bad) = (0, sorted.len());
    while bad - good > 1 {
        let mid = (good + bad) / 2;
        if fails(&sorted[mid..]) {
            good = mid;
        } else {
            bad = mid;
        }
    }
    sorted.split_off(good)
}

/// Wing & Gong's search with Lowe's cache over `ops` (one key), from `init`.
fn search(ops: &[Op], init: &[Reg]) -> Search {
    let n = ops.len();
    // The events in time order: node 2i is op i's call, 2i+1 its return (an unknown
    // outcome returns after everything). At equal times calls come first: two ops that
    // touch the same instant count as concurrent.
    let mut order: Vec<usize> = (0..2 * n).collect();
    let time = |node: usize| {
        let op = &ops[node / 2];
        if node % 2 == 0 {
            (op.invoked, 0)
        } else {
            (op.completed.unwrap_or(u64::MAX), 1)
        }
    };
    order.sort_by_key(|&node| time(node));
    // a doubly linked list over the nodes; `head` is a sentinel
    let head = 2 * n;
    const NIL: usize = usize::MAX;
    let mut next = vec![NIL; 2 * n + 1];
    let mut prev = vec![NIL; 2 * n + 1];
    let mut last = head;
    for &node in &order {
        next[last] = node;
        prev[node] = last;
        last = node;
    }
    let unlink = |node: usize, next: &mut Vec<usize>, prev: &mut Vec<usize>| {
        let (p, q) = (prev[node], next[node]);
        next[p] = q;
        if q != NIL {
            prev[q] = p;
        }
    };
    let relink = |node: usize, next: &mut Vec<usize>, prev: &mut Vec<usize>| {
        let (p, q) = (prev[node], next[node]);
        next[p] = node;
        if q != NIL {
            prev[q] = node;
        }
    };

    let words = n.div_ceil(64);
    let mut linearized = vec![0u64; words];
    let mut cache: HashSet<(Vec<u64>, Vec<Reg>)> = HashSet::new();
    let mut calls: Vec<(usize, Vec<Reg>)> = Vec::new();
    let mut state: Vec<Reg> = init.to_vec();
    let mut deepest: (usize, Vec<u64>) = (0, linearized.clone());
    let mut entry = next[head];
    let mut steps = 0u64;
    // calls that must be linearized (those of unknown outcome may be left out)
    let mut definite = ops.iter().filter(|o| o.completed.is_some()).count();
    while definite > 0 {
        steps += 1;
        if steps > BUDGET {
            return Search::OutOfBudget;
        }
        if entry % 2 == 0 {
            let i = entry / 2;
            let after = step_all(&state, &ops[i]);
            if !after.is_empty() {
                linearized[i / 64] |= 1 << (i % 64);
                if cache.insert((linearized.clone(), after.clone())) {
                    calls.push((entry, std::mem::replace(&mut state, after)));
                    definite -= usize::from(ops[i].completed.is_some());
                    unlink(entry, &mut next, &mut prev);
                    unlink(entry + 1, &mut next, &mut prev);
                    if calls.len() > deepest.0 {
                        deepest = (calls.len(), linearized.clone());
                    }
                    entry = next[head];
                    continue;
                }
                linearized[i / 64] &= !(1 << (i % 64));
            }
            entry = next[entry];
        } else {
            let Some((call, before)) = calls.pop() else {
                let done = (0..n).map(|i| deepest.1[i / 64] >> (i % 64) & 1 == 1);
                return Search::Stuck(done.collect());
            };
            let i = call / 2;
            linearized[i / 64] &= !(1 << (i % 64));
            definite += usize::from(ops[i].completed.is_some());
            state = before;
            relink(call + 1, &mut next, &mut prev);
            relink(call, &mut next, &mut prev);
            entry = next[call];
        }
    }
    Search::Linearizable
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An op on key "k" from `client`, invoked at `a` ms and completed at `b` ms.
    fn op(client: usize, a: u64, b: Option<u64>, call: Call, outcome: Outcome) -> Op {
        Op {
            client,
            key: "k".into(),
            call,
            outcome,
            invoked: a * 1_000_000,
            completed: b.map(|b| b * 1_000_000),
        }
    }
    use Call::*;
    use Outcome::*;

    /// An update of `value` if the version is still `expect`.
    fn cas(value: Value, expect: Rv) -> Call {
        Update { value, expect }
    }

    fn verdict(h: &[Op]) -> bool {
        check(h).linearizable()
    }

    #[test]
    fn a_sequential_history_that_follows_the_model_is_linearizable() {
        let h = [
            op(0, 0, Some(1), Get, NotFound),
            op(0, 2, Some(3), Create(1), Created(10)),
            op(1, 4, Some(5), Create(2), Exists),
            op(1, 6, Some(7), Get, Found(1, 10)),
            op(0, 8, Some(9), cas(3, 10), Updated(11)),
            op(1, 10, Some(11), cas(4, 10), Conflict),
            op(0, 12, Some(13), Get, Found(3, 11)),
            op(0, 14, Some(15), Delete, Deleted),
            op(1, 16, Some(17), cas(5, 11), NotFound),
            op(1, 18, Some(19), Delete, NotFound),
        ];
        assert!(verdict(&h), "{}", check(&h));
    }

    #[test]
    fn a_stale_read_after_an_acknowledged_update_is_a_violation() {
        let h = [
            op(0, 0, Some(1), Create(1), Created(10)),
            op(0, 2, Some(3), cas(2, 10), Updated(11)),
            op(1, 4, Some(5), Get, Found(1, 10)),
        ];
        let r = check(&h);
        assert!(!r.linearizable());
        match &r.problems[0].1 {
            KeyVerdict::Violation { stuck, window } => {
                assert_eq!(stuck.outcome, Found(1, 10));
                assert!(window.len() <= 2, "{r}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_read_concurrent_with_a_write_may_see_either_value() {
        for seen in [Found(1, 10), Found(2, 11)] {
            let h = [
                op(0, 0, Some(1), Create(1), Created(10)),
                op(0, 2, Some(10), cas(2, 10), Updated(11)),
                op(1, 3, Some(5), Get, seen),
            ];
            assert!(verdict(&h), "{seen:?}: {}", check(&h));
        }
        // ... but a read that begins after another read saw the new value cannot go back
        let h = [
            op(0, 0, Some(1), Create(1), Created(10)),
            op(0, 2, Some(10), cas(2, 10), Updated(11)),
            op(1, 3, Some(4), Get, Found(2, 11)),
            op(2, 5, Some(6), Get, Found(1, 10)),
        ];
        assert!(!verdict(&h));
    }

    #[test]
    fn an_acknowledged_write_that_disappears_is_a_violation() {
        let h = [
            op(0, 0, Some(1), Create(1), Created(10)),
            op(1, 2, Some(3), Get, NotFound),
        ];
        assert!(!verdict(&h));
    }

    #[test]
    fn a_call_with_an_unknown_outcome_may_or_may_not_have_taken_effect() {
        for later in [NotFound, Found(1, 12)] {
            let h = [
                op(0, 0, None, Create(1), Unknown),
                op(1, 5, Some(6), Get, later),
            ];
            assert!(verdict(&h), "{later:?}: {}", check(&h));
        }
        // but once seen it stays: it cannot be un-applied
        let h = [
            op(0, 0, None, Create(1), Unknown),
            op(1, 5, Some(6), Get, Found(1, 12)),
            op(1, 7, Some(8), Get, NotFound),
        ];
        assert!(!verdict(&h));
        // an update whose answer was lost, then a CAS on the version a read revealed
        let h = [
            op(0, 0, Some(1), Create(1), Created(10)),
            op(0, 2, None, cas(2, 10), Unknown),
            op(1, 5, Some(6), Get, Found(2, 13)),
            op(1, 7, Some(8), cas(3, 13), Updated(14)),
        ];
        assert!(verdict(&h), "{}", check(&h));
    }

    #[test]
    fn a_write_applied_twice_is_a_violation() {
        // the create was applied, retried, and answered "exists": its value is there
        let h = [
            op(0, 0, Some(3), Create(1), Exists),
            op(1, 4, Some(5), Get, Found(1, 10)),
        ];
        assert!(!verdict(&h));
        // an update applied, then replayed and answered "conflict"
        let h = [
            op(0, 0, Some(1), Create(1), Created(10)),
            op(0, 2, Some(6), cas(2, 10), Conflict),
            op(1, 7, Some(8), Get, Found(2, 11)),
        ];
        assert!(!verdict(&h));
    }

    #[test]
    fn two_compare_and_swaps_from_one_version_cannot_both_succeed() {
        let h = [
            op(0, 0, Some(1), Create(1), Created(10)),
            op(0, 2, Some(5), cas(2, 10), Updated(11)),
            op(1, 2, Some(5), cas(3, 10), Updated(12)),
        ];
        assert!(!verdict(&h));
        let h = [
            op(0, 0, Some(1), Create(1), Created(10)),
            op(0, 2, Some(5), cas(2, 10), Updated(11)),
            op(1, 2, Some(5), cas(3, 10), Conflict),
        ];
        assert!(verdict(&h));
    }

    /// A register simulated by many overlapping clients, each op applied at a random
    /// instant inside its interval: always linearizable, and checked quickly. Then one
    /// read changed to a value the register held long before: a violation, reported with
    /// a window of a few ops.
    #[test]
    fn a_long_concurrent_history_is_checked_quickly_and_a_planted_stale_read_found() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut rand = |m: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % m
        };
        // (applied at, op) with the register's true evolution
        let (mut reg, mut rv, mut value) = (None::<(Value, Rv)>, 1u64, 0u64);
        let mut ops = Vec::new();
        let mut t = 0;
        for i in 0..3000 {
            t += 1 + rand(3);
            let client = i % 8;
            let (call, outcome) = match rand(4) {
                0 => {
                    value += 1;
                    match reg {
                        None => {
                            rv += 1;
                            reg = Some((value, rv));
                            (Create(value), Created(rv))
                        }
                        Some(_) => (Create(value), Exists),
                    }
                }
                1 => match reg {
                    Some((v, r)) => (Get, Found(v, r)),
                    None => (Get, NotFound),
                },
                2 => {
                    value += 1;
                    let expect = if rand(2) == 0 { rv } else { rv - 1 };
                    match reg {
                        Some((_, r)) if r == expect => {
                            rv += 1;
                            reg = Some((value, rv));
                            (Update { value, expect }, Updated(rv))
                        }
                        Some(_) => (Update { value, expect }, Conflict),
                        None => (Update { value, expect }, NotFound),
                    }
                }
                _ => {
                    let o = if reg.is_some() { Deleted } else { NotFound };
                    reg = None;
                    (Delete, o)
                }
            };
            let before = rand(20);
            let after = rand(20);
            ops.push(Op {
                client,
                key: "k".into(),
                call,
                outcome,
                invoked: (t * 10).saturating_sub(before),
                completed: Some(t * 10 + after),
            });
        }
        let started = std::time::Instant::now();
        let r = check(&ops);
        assert!(r.linearizable(), "{r}");
        assert!(started.elapsed().as_secs() < 10, "{:?}", started.elapsed());

        let i = ops
            .iter()
            .rposition(|o| matches!(o.outcome, Found(..)))
            .unwrap();
        let stale = ops[..i - 200]
            .iter()
            .find_map(|o| match o.outcome {
                Found(v, r) => Some(Found(v, r)),
                _ => None,
            })
            .unwrap();
        ops[i].outcome = stale;
        let r = check(&ops);
        match &r.problems[..] {
            [(_, KeyVerdict::Violation { window, .. })] => {
                assert!(window.len() <= 12, "{r}");
                assert!(window.contains(&ops[i]), "{r}");
            }
            other => panic!("{other:?}"),
        }
    }
}
