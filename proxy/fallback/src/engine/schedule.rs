//! Which sequences go into the next forward pass: a pure decision, kept
//! apart from the thread that runs it so it can be tested case by case.
//!
//! The unit of scheduling is the sequence (one input text), not the
//! request: a request of 200 inputs is 200 queued sequences. Each pass
//! takes sequences round robin over the queued requests, starting after the
//! request that was served last, so a one-input request arriving behind a
//! 200-input one rides in the very next pass instead of waiting for all of
//! it. Before a pass is chosen, requests whose caller has gone or whose
//! deadline has passed leave the queue with their unfinished sequences.

use std::time::Instant;

/// Why queued sequences were dropped without being computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// The caller stopped waiting (client gone, or its future dropped).
    Cancelled,
    /// The request's deadline passed before its sequences were computed.
    Expired,
}

impl DropReason {
    /// The reason as a metric label: `cancelled` or `expired`.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::Cancelled => "cancelled",
            DropReason::Expired => "expired",
        }
    }
}

/// The limits one forward pass must stay within.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PassLimits {
    /// Most sequences in the pass.
    pub max_sequences: usize,
    /// Most padded tokens (sequences × the longest) in the pass; one
    /// sequence alone always gets a pass, however long.
    pub max_padded_tokens: usize,
}

/// A queued request, as the scheduler sees it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Waiting<'a> {
    /// Arrival order: larger ids arrived later.
    pub id: u64,
    /// Token counts of the sequences not yet computed, in the order they
    /// are to be taken.
    pub remaining: &'a [usize],
    /// When its answer stops being wanted.
    pub deadline: Option<Instant>,
    /// Its caller has gone.
    pub cancelled: bool,
}

/// What to do before the next pass.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Decision {
    /// Requests (queue positions) to remove without an answer, and why.
    pub dropped: Vec<(usize, DropReason)>,
    /// How many of its remaining sequences (from the front) each request
    /// sends into the pass, by queue position, in queue order; never zero.
    pub taken: Vec<(usize, usize)>,
    /// The id of the request that took the pass's last place: the next
    /// pass starts after it.
    pub last: Option<u64>,
}

/// Decides the next pass for `queue` (in arrival order) at `now`. `after`
/// is the previous decision's `last`: the round robin starts at the first
/// request that arrived after it, wrapping round, so no request is
/// starved when more requests wait than a pass holds.
pub(crate) fn next_pass(
    queue: &[Waiting<'_>],
    after: Option<u64>,
    now: Instant,
    limits: PassLimits,
) -> Decision {
    let mut decision = Decision::default();
    let mut live = Vec::with_capacity(queue.len());
    for (position, waiting) in queue.iter().enumerate() {
        // An expired request is counted as expired even when its caller
        // has gone too: the time limit is why the caller left.
        if waiting.deadline.is_some_and(|deadline| deadline <= now) {
            decision.dropped.push((position, DropReason::Expired));
        } else if waiting.cancelled {
            decision.dropped.push((position, DropReason::Cancelled));
        } else if !waiting.remaining.is_empty() {
            live.push(position);
        }
    }
    if live.is_empty() {
        return decision;
    }
    let first = after
        .and_then(|after| live.iter().position(|&p| queue[p].id > after))
        .unwrap_or(0);
    live.rotate_left(first);

    let mut counts = vec![0usize; queue.len()];
    // A request stops taking places once its next sequence does not fit.
    let mut open = live;
    let mut sequences = 0;
    let mut longest = 0;
    while sequences < limits.max_sequences && !open.is_empty() {
        let mut still_open = Vec::with_capacity(open.len());
        for &position in &open {
            if sequences == limits.max_sequences {
                still_open.clear();
                break;
            }
            let remaining = queue[position].remaining;
            let taken = counts[position];
            let Some(&len) = remaining.get(taken) else {
                continue;
            };
            let padded = (sequences + 1) * longest.max(len);
            if sequences > 0 && padded > limits.max_padded_tokens {
                continue;
            }
            counts[position] += 1;
            sequences += 1;
            longest = longest.max(len);
            decision.last = Some(queue[position].id);
            if taken + 1 < remaining.len() {
                still_open.push(position);
            }
        }
        open = still_open;
    }
    decision.taken = counts
        .into_iter()
        .enumerate()
        .filter(|&(_, count)| count > 0)
        .collect();
    decision
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn limits(sequences: usize, tokens: usize) -> PassLimits {
        PassLimits {
            max_sequences: sequences,
            max_padded_tokens: tokens,
        }
    }

    fn waiting(id: u64, remaining: &[usize]) -> Waiting<'_> {
        Waiting {
            id,
            remaining,
            deadline: None,
            cancelled: false,
        }
    }

    #[test]
    fn one_request_fills_the_pass_in_its_own_order() {
        let now = Instant::now();
        let lengths = [5; 40];
        let decision = next_pass(&[waiting(0, &lengths)], None, now, limits(32, 8192));
        assert_eq!(decision.taken, vec![(0, 32)]);
        assert!(decision.dropped.is_empty());
        assert_eq!(decision.last, Some(0));
    }

    #[test]
    fn a_short_request_behind_a_long_one_rides_in_the_next_pass() {
        let now = Instant::now();
        let long = [8; 200];
        let short = [8];
        let queue = [waiting(0, &long), waiting(1, &short)];
        let decision = next_pass(&queue, None, now, limits(32, 8192));
        assert_eq!(decision.taken, vec![(0, 31), (1, 1)]);
    }

    #[test]
    fn places_are_shared_round_robin_between_long_requests() {
        let now = Instant::now();
        let a = [8; 100];
        let b = [8; 100];
        let c = [8; 3];
        let queue = [waiting(0, &a), waiting(1, &b), waiting(2, &c)];
        let decision = next_pass(&queue, None, now, limits(10, 8192));
        // a b c a b c a b c a: c runs out after three.
        assert_eq!(decision.taken, vec![(0, 4), (1, 3), (2, 3)]);
        assert_eq!(decision.last, Some(0));
    }

    #[test]
    fn the_next_pass_starts_after_the_request_served_last() {
        let now = Instant::now();
        let runs = [[8usize; 50]; 5];
        let queue: Vec<_> = runs
            .iter()
            .enumerate()
            .map(|(id, r)| waiting(id as u64, r))
            .collect();
        // Two places for five requests: 0 and 1, then 2 and 3, then 4 and 0.
        let first = next_pass(&queue, None, now, limits(2, 8192));
        assert_eq!(first.taken, vec![(0, 1), (1, 1)]);
        let second = next_pass(&queue, first.last, now, limits(2, 8192));
        assert_eq!(second.taken, vec![(2, 1), (3, 1)]);
        let third = next_pass(&queue, second.last, now, limits(2, 8192));
        assert_eq!(third.taken, vec![(0, 1), (4, 1)]);
        assert_eq!(third.last, Some(0));
    }

    #[test]
    fn the_round_robin_resumes_after_a_request_that_left() {
        let now = Instant::now();
        let runs = [8usize; 10];
        // Request 3 was served last and has gone: 4 comes next.
        let queue = [waiting(1, &runs), waiting(4, &runs), waiting(6, &runs)];
        let decision = next_pass(&queue, Some(3), now, limits(1, 8192));
        assert_eq!(decision.taken, vec![(1, 1)]);
        // Past the newest request, it wraps round to the oldest.
        let decision = next_pass(&queue, Some(6), now, limits(1, 8192));
        assert_eq!(decision.taken, vec![(0, 1)]);
    }

    #[test]
    fn a_cancelled_request_leaves_and_takes_no_place() {
        let now = Instant::now();
        let long = [8; 200];
        let short = [8];
        let mut gone = waiting(0, &long);
        gone.cancelled = true;
        let queue = [gone, waiting(1, &short)];
        let decision = next_pass(&queue, None, now, limits(32, 8192));
        assert_eq!(decision.dropped, vec![(0, DropReason::Cancelled)]);
        assert_eq!(decision.taken, vec![(1, 1)]);
    }

    #[test]
    fn an_expired_request_leaves_even_when_its_caller_is_gone() {
        let now = Instant::now();
        let lengths = [8; 4];
        let mut expired = waiting(0, &lengths);
        expired.deadline = Some(now);
        let mut both = waiting(1, &lengths);
        both.deadline = Some(now - Duration::from_secs(1));
        both.cancelled = true;
        let mut later = waiting(2, &lengths);
        later.deadline = Some(now + Duration::from_millis(1));
        let decision = next_pass(&[expired, both, later], None, now, limits(32, 8192));
        assert_eq!(
            decision.dropped,
            vec![(0, DropReason::Expired), (1, DropReason::Expired)]
        );
        assert_eq!(decision.taken, vec![(2, 4)]);
    }

    #[test]
    fn nothing_is_taken_when_every_request_has_left() {
        let now = Instant::now();
        let lengths = [8; 4];
        let mut gone = waiting(0, &lengths);
        gone.cancelled = true;
        let decision = next_pass(&[gone], None, now, limits(32, 8192));
        assert_eq!(decision.dropped, vec![(0, DropReason::Cancelled)]);
        assert!(decision.taken.is_empty());
        assert_eq!(decision.last, None);
        assert_eq!(
            next_pass(&[], None, now, limits(32, 8192)),
            Decision::default()
        );
    }

    #[test]
    fn the_padded_token_limit_closes_a_request_but_not_the_pass() {
        let now = Instant::now();
        // 3 x 100 = 300 padded tokens would pass 60: the first request's
        // long sequence waits, the other's short ones still fit.
        let mixed = [10, 100];
        let short = [10, 10, 10];
        let queue = [waiting(0, &mixed), waiting(1, &short)];
        let decision = next_pass(&queue, None, now, limits(32, 60));
        assert_eq!(decision.taken, vec![(0, 1), (1, 3)]);
        // A long sequence that would pad the pass past the limit waits.
        let long = [100];
        let queue = [waiting(0, &short), waiting(1, &long)];
        let decision = next_pass(&queue, None, now, limits(32, 150));
        assert_eq!(decision.taken, vec![(0, 3)]);
    }

    #[test]
    fn a_long_sequence_kept_out_of_one_pass_leads_the_next() {
        let now = Instant::now();
        let short = [10; 20];
        let long = [100];
        let queue = [waiting(0, &short), waiting(1, &long)];
        let first = next_pass(&queue, None, now, limits(4, 150));
        assert_eq!(first.taken, vec![(0, 4)]);
        assert_eq!(first.last, Some(0));
        let second = next_pass(&queue, first.last, now, limits(4, 150));
        assert_eq!(second.taken, vec![(1, 1)]);
    }

    #[test]
    fn one_sequence_longer_than_the_token_limit_still_gets_a_pass() {
        let now = Instant::now();
        let lengths = [300, 300];
        let decision = next_pass(&[waiting(0, &lengths)], None, now, limits(32, 256));
        assert_eq!(decision.taken, vec![(0, 1)]);
    }

    #[test]
    fn a_request_with_nothing_left_takes_no_place() {
        let now = Instant::now();
        let lengths = [8, 8];
        let queue = [waiting(0, &[]), waiting(1, &lengths)];
        let decision = next_pass(&queue, None, now, limits(32, 8192));
        assert_eq!(decision.taken, vec![(1, 2)]);
        assert!(decision.dropped.is_empty());
    }

    #[test]
    fn the_sequence_limit_holds_across_requests() {
        let now = Instant::now();
        let runs = [[8usize; 3]; 4];
        let queue: Vec<_> = runs
            .iter()
            .enumerate()
            .map(|(id, r)| waiting(id as u64, r))
            .collect();
        let decision = next_pass(&queue, None, now, limits(5, 8192));
        assert_eq!(decision.taken, vec![(0, 2), (1, 1), (2, 1), (3, 1)]);
        assert_eq!(decision.last, Some(0));
    }
}
