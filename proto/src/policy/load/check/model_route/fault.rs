//! Checks of a route's `faults`.

use crate::policy::load::check::format::percent_problem;
use crate::policy::FaultPolicy;

/// What is wrong with a route's faults, by path under `faults`.
pub(super) fn fault_problems(faults: &FaultPolicy) -> Vec<(Vec<&'static str>, String)> {
    let mut problems = Vec::new();
    if faults.delay.is_none() && faults.abort.is_none() {
        problems.push((
            Vec::new(),
            "`faults` needs a `delay`, an `abort` or both".to_owned(),
        ));
    }
    if let Some(delay) = &faults.delay {
        if let Some(problem) = percent_problem(delay.percent) {
            problems.push((vec!["delay", "percent"], problem));
        }
    }
    if let Some(abort) = &faults.abort {
        if let Some(problem) = percent_problem(abort.percent) {
            problems.push((vec!["abort", "percent"], problem));
        }
        match (abort.status, abort.grpc_status) {
            (None, None) => problems.push((
                vec!["abort"],
                "an `abort` needs a `status` (HTTP), a `grpcStatus` or both".to_owned(),
            )),
            (Some(status), _) if !(400..=599).contains(&status) => problems.push((
                vec!["abort", "status"],
                format!("an abort `status` must be an error, 400 to 599, found {status}"),
            )),
            _ => {}
        }
    }
    problems
}
