//! Leader election over a `coordination.k8s.io` Lease, the decision part. Pure: given the Lease
//! as read, who we are and the time, what to write (or that someone else leads). The edge writes
//! the result with the Lease's resourceVersion, so two candidates cannot both win a takeover.

use k8s_openapi::{
    api::coordination::v1::LeaseSpec,
    apimachinery::pkg::apis::meta::v1::MicroTime,
    jiff::{SignedDuration, Timestamp},
};

/// What to do with the Lease.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// We hold it: write this spec (renewed) and keep leading.
    Renew(LeaseSpec),
    /// It is free or expired: write this spec to take it, then lead.
    Acquire(LeaseSpec),
    /// Someone else holds it until `expires`: do not lead.
    Follow { holder: String, expires: Timestamp },
}

/// When the Lease runs out: its last renewal (or acquisition) plus its duration
/// (`default_duration` when it states none); `None` when it was never taken.
pub fn expiry(spec: &LeaseSpec, default_duration: i32) -> Option<Timestamp> {
    let last = spec.renew_time.as_ref().or(spec.acquire_time.as_ref())?.0;
    let secs = spec.lease_duration_seconds.unwrap_or(default_duration);
    last.checked_add(SignedDuration::from_secs(i64::from(secs)))
        .ok()
}

/// Decides for candidate `me` at `now`; `duration` is the lease duration we write, in seconds.
pub fn decide(current: Option<&LeaseSpec>, me: &str, now: Timestamp, duration: i32) -> Decision {
    let holder = current
        .and_then(|s| s.holder_identity.clone())
        .filter(|h| !h.is_empty());
    let transitions = current.and_then(|s| s.lease_transitions).unwrap_or(0);
    match (holder, current) {
        (Some(h), Some(spec)) if h == me => Decision::Renew(LeaseSpec {
            renew_time: Some(MicroTime(now)),
            lease_duration_seconds: Some(duration),
            ..spec.clone()
        }),
        (Some(h), Some(spec)) => match expiry(spec, duration) {
            Some(expires) if now < expires => Decision::Follow { holder: h, expires },
            _ => Decision::Acquire(take(me, now, duration, transitions + 1)),
        },
        _ => Decision::Acquire(take(me, now, duration, transitions)),
    }
}

fn take(me: &str, now: Timestamp, duration: i32, transitions: i32) -> LeaseSpec {
    LeaseSpec {
        holder_identity: Some(me.to_string()),
        lease_duration_seconds: Some(duration),
        acquire_time: Some(MicroTime(now)),
        renew_time: Some(MicroTime(now)),
        lease_transitions: Some(transitions),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + secs).unwrap()
    }

    #[test]
    fn a_missing_or_empty_lease_is_acquired() {
        let Decision::Acquire(spec) = decide(None, "a", at(0), 15) else {
            panic!("not acquired")
        };
        assert_eq!(spec.holder_identity.as_deref(), Some("a"));
        assert_eq!(spec.lease_transitions, Some(0));
        let empty = LeaseSpec::default();
        assert!(matches!(
            decide(Some(&empty), "a", at(0), 15),
            Decision::Acquire(_)
        ));
    }

    #[test]
    fn the_holder_renews_and_keeps_its_acquire_time() {
        let held = take("a", at(0), 15, 3);
        let Decision::Renew(spec) = decide(Some(&held), "a", at(5), 15) else {
            panic!("not renewed")
        };
        assert_eq!(spec.renew_time, Some(MicroTime(at(5))));
        assert_eq!(spec.acquire_time, Some(MicroTime(at(0))));
        assert_eq!(spec.lease_transitions, Some(3));
    }

    #[test]
    fn others_follow_until_the_lease_expires_then_take_it_over() {
        let held = take("a", at(0), 15, 0);
        assert_eq!(
            decide(Some(&held), "b", at(14), 15),
            Decision::Follow {
                holder: "a".into(),
                expires: at(15)
            }
        );
        let Decision::Acquire(spec) = decide(Some(&held), "b", at(15), 15) else {
            panic!("not taken over at expiry")
        };
        assert_eq!(spec.holder_identity.as_deref(), Some("b"));
        assert_eq!(
            spec.lease_transitions,
            Some(1),
            "a takeover is a transition"
        );
    }

    #[test]
    fn the_lease_duration_written_by_the_holder_is_the_one_that_counts() {
        let held = take("a", at(0), 60, 0);
        assert!(matches!(
            decide(Some(&held), "b", at(30), 15),
            Decision::Follow { .. }
        ));
    }
}
