//! Per-organisation rate limits (token buckets from governor): a routine quota, per-org
//! overrides, and a separate reserve for emergency treatment (ETREAT) so that an emergency
//! department's urgent requests never queue behind its own routine traffic.

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};
use std::collections::HashMap;
use std::num::NonZeroU32;

use crate::config::RateLimitConfig;
use crate::ids::OrgId;

pub struct RateLimits {
    routine: DefaultKeyedRateLimiter<OrgId>,
    emergency: DefaultKeyedRateLimiter<OrgId>,
    overrides: HashMap<String, DefaultDirectRateLimiter>,
    clock: DefaultClock,
}

fn quota(per_second: u32, burst: u32) -> Quota {
    let rate = NonZeroU32::new(per_second).unwrap_or(NonZeroU32::MIN);
    Quota::per_second(rate).allow_burst(NonZeroU32::new(burst).unwrap_or(rate))
}

impl RateLimits {
    pub fn new(c: &RateLimitConfig) -> RateLimits {
        RateLimits {
            routine: RateLimiter::keyed(quota(c.requests_per_second, c.burst)),
            emergency: RateLimiter::keyed(quota(
                c.emergency_requests_per_second,
                c.emergency_burst,
            )),
            overrides: c
                .overrides
                .iter()
                .map(|(org, o)| {
                    (
                        org.clone(),
                        RateLimiter::direct(quota(o.requests_per_second, o.burst)),
                    )
                })
                .collect(),
            clock: DefaultClock::default(),
        }
    }

    /// `Err(seconds to wait)` when the organisation is over its quota.
    pub fn check(&self, org: &OrgId, emergency: bool) -> Result<(), u64> {
        let result = if emergency {
            self.emergency.check_key(org)
        } else if let Some(limiter) = self.overrides.get(org.as_str()) {
            limiter.check()
        } else {
            self.routine.check_key(org)
        };
        result.map_err(|not_until| {
            let wait = not_until.wait_time_from(self.clock.now());
            wait.as_secs() + u64::from(wait.subsec_nanos() > 0)
        })
    }

    /// Forgets idle organisations' buckets (call periodically: keyed limiters grow per key).
    pub fn retain_recent(&self) {
        self.routine.retain_recent();
        self.emergency.retain_recent();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn emergency_reserve_survives_routine_exhaustion() {
        let limits = RateLimits::new(&RateLimitConfig {
            requests_per_second: 1,
            burst: 2,
            emergency_requests_per_second: 1,
            emergency_burst: 1,
            overrides: BTreeMap::new(),
        });
        let er = OrgId::parse("city-er").expect("id");
        assert!(limits.check(&er, false).is_ok());
        assert!(limits.check(&er, false).is_ok());
        let wait = limits.check(&er, false).expect_err("over quota");
        assert!(wait >= 1);
        assert!(
            limits.check(&er, true).is_ok(),
            "ETREAT draws from its own reserve"
        );
        let other = OrgId::parse("other-clinic").expect("id");
        assert!(
            limits.check(&other, false).is_ok(),
            "buckets are per organisation"
        );
    }
}
