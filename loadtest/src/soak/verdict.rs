//! The soak's judgement: RSS growth after the warm-up, and the pass/fail rules over the counts, the server's
//! own 5xx counter, the RSS curve and the gauges after the drain. Pure: no I/O.

use serde::Serialize;

use super::probe::{Phase, Reading};
use super::tally::Counts;

/// How RSS moved after the warm-up, while the load was on.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct RssGrowth {
    /// The first reading at or after the end of the warm-up.
    pub warmup_end_s: f64,
    pub warmup_end_bytes: u64,
    /// The last reading while requests were still being started.
    pub end_s: f64,
    pub end_bytes: u64,
    /// `end_bytes - warmup_end_bytes` (negative when RSS fell).
    pub growth_bytes: i64,
    /// The growth in percent of `warmup_end_bytes`.
    pub growth_pct: f64,
    /// Highest reading from the end of the warm-up to the end of the load.
    pub peak_bytes: u64,
}

/// When the warm-up ends: at `seconds` into the load, or once `answered` requests have ended, whichever is
/// later.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Warmup {
    pub seconds: f64,
    pub answered: u64,
}

/// RSS growth from the end of the warm-up to the last reading under load; `None` without RSS readings on
/// both sides (the warm-up ended too late, or there is no RSS source).
impl RssGrowth {
    /// "A MiB at t0 s -> B MiB at t1 s: +C MiB (+D%)".
    pub fn describe(&self) -> String {
        format!(
            "{:.1} MiB at {:.0} s -> {:.1} MiB at {:.0} s: {:+.1} MiB ({:+.1}%)",
            self.warmup_end_bytes as f64 / MIB,
            self.warmup_end_s,
            self.end_bytes as f64 / MIB,
            self.end_s,
            self.growth_bytes as f64 / MIB,
            self.growth_pct
        )
    }
}

pub fn rss_growth(readings: &[Reading], warmup: Warmup) -> Option<RssGrowth> {
    let under_load: Vec<(f64, u64)> = readings
        .iter()
        .filter(|r| r.phase == Phase::Load && r.t_s >= warmup.seconds && r.answered >= warmup.answered)
        .filter_map(|r| r.rss_bytes.map(|b| (r.t_s, b)))
        .collect();
    let (&(warmup_end_s, warmup_end_bytes), &(end_s, end_bytes)) = (under_load.first()?, under_load.last()?);
    if end_s <= warmup_end_s {
        return None;
    }
    let growth_bytes = end_bytes as i64 - warmup_end_bytes as i64;
    Some(RssGrowth {
        warmup_end_s,
        warmup_end_bytes,
        end_s,
        end_bytes,
        growth_bytes,
        growth_pct: 100.0 * growth_bytes as f64 / warmup_end_bytes.max(1) as f64,
        peak_bytes: under_load.iter().map(|&(_, b)| b).max().unwrap_or(end_bytes),
    })
}

/// The gauges once every request had ended.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Drain {
    /// `running` and `waiting` read 0 (and KV usage 0, when exported) before the drain timeout.
    pub drained: bool,
    /// Seconds from the last answer to the last reading.
    pub waited_s: f64,
    pub running: Option<f64>,
    pub waiting: Option<f64>,
    pub kv_usage: Option<f64>,
    pub rss_bytes: Option<u64>,
}

impl Drain {
    /// Whether a reading shows nothing left: the gauges at 0 (KV usage only when exported).
    pub fn empty(r: &Reading) -> bool {
        r.running == Some(0.0) && r.waiting == Some(0.0) && r.kv_usage.is_none_or(|k| k == 0.0)
    }
}

/// How a rule came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Check {
    Pass,
    Fail,
    /// Nothing to judge it by (no RSS source, no gauges); does not fail the verdict.
    Skipped,
}

/// One rule of the verdict.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Rule {
    pub name: &'static str,
    pub check: Check,
    pub detail: String,
}

/// Pass when no rule failed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Verdict {
    pub pass: bool,
    pub rules: Vec<Rule>,
}

/// What the verdict judges.
#[derive(Debug, Clone, Copy)]
pub struct Evidence<'a> {
    pub counts: &'a Counts,
    /// 5xx answers the server itself counted during the soak (its HTTP counter's increase).
    pub server_5xx: Option<u64>,
    pub rss: Option<&'a RssGrowth>,
    pub warmup: Warmup,
    /// Requests answered by the last reading under load, and whether any reading had RSS.
    pub answered_under_load: u64,
    pub rss_measured: bool,
    /// Percent.
    pub max_rss_growth: f64,
    pub drain: &'a Drain,
}

fn rule(name: &'static str, pass: bool, detail: String) -> Rule {
    Rule {
        name,
        check: if pass { Check::Pass } else { Check::Fail },
        detail,
    }
}

const MIB: f64 = 1024.0 * 1024.0;

/// Judges the soak.
pub fn verdict(e: Evidence) -> Verdict {
    let c = e.counts;
    let seen_5xx = match e.server_5xx {
        Some(n) => format!("{} answered 5xx; the server counted {n}", c.server_5xx),
        None => format!(
            "{} answered 5xx; the server exports no HTTP status counter",
            c.server_5xx
        ),
    };
    let drain_detail = |d: &Drain| {
        let show = |v: Option<f64>| v.map_or("absent".to_string(), |v| format!("{v}"));
        format!(
            "running {}, waiting {}, KV usage {} after {:.1} s",
            show(d.running),
            show(d.waiting),
            show(d.kv_usage),
            d.waited_s
        )
    };
    let mut rules = vec![
        rule(
            "served",
            c.served() > 0,
            format!("{} of {} answered 2xx", c.served(), c.answered),
        ),
        rule(
            "no_5xx",
            c.server_5xx == 0 && e.server_5xx.unwrap_or(0) == 0,
            seen_5xx,
        ),
        rule(
            "refusals_are_429_with_retry_after",
            c.refused_429_without_retry_after == 0 && c.unexpected_4xx == 0 && c.other_status == 0,
            format!(
                "{} refused with 429, {} of them without Retry-After; {} well-formed requests got another 4xx, {} a 1xx/3xx",
                c.refused_429, c.refused_429_without_retry_after, c.unexpected_4xx, c.other_status
            ),
        ),
        rule(
            "bad_requests_get_their_4xx",
            c.bad_accepted == 0 && c.bad_wrong_status == 0,
            format!(
                "{} got their 4xx, {} were accepted, {} got another 4xx",
                c.expected_4xx, c.bad_accepted, c.bad_wrong_status
            ),
        ),
        rule(
            "no_transport_errors",
            c.transport == 0,
            match c.transport_by_kind.is_empty() {
                true => "0".to_string(),
                false => c
                    .transport_by_kind
                    .iter()
                    .map(|(k, n)| format!("{k}: {n}"))
                    .collect::<Vec<_>>()
                    .join(", "),
            },
        ),
    ];
    rules.push(match e.rss {
        Some(g) => rule(
            "rss_flat",
            g.growth_pct <= e.max_rss_growth,
            format!("{} (limit +{}%)", g.describe(), e.max_rss_growth),
        ),
        None => Rule {
            name: "rss_flat",
            check: Check::Skipped,
            detail: match e.rss_measured {
                false => "no RSS readings (give --server-pid)".into(),
                true => format!(
                    "the warm-up ({} s and {} answered requests) did not end while the load was on (last reading: {} answered)",
                    e.warmup.seconds, e.warmup.answered, e.answered_under_load
                ),
            },
        },
    });
    let d = e.drain;
    rules.push(if d.running.is_none() || d.waiting.is_none() {
        Rule {
            name: "no_leaked_slot",
            check: Check::Skipped,
            detail: format!("the running and waiting gauges cannot be read: {}", drain_detail(d)),
        }
    } else {
        rule("no_leaked_slot", d.drained, drain_detail(d))
    });
    Verdict {
        pass: rules.iter().all(|r| r.check != Check::Fail),
        rules,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(t_s: f64, phase: Phase, mib: u64) -> Reading {
        Reading {
            t_s,
            phase,
            rss_bytes: Some(mib << 20),
            running: Some(1.0),
            waiting: Some(0.0),
            kv_usage: Some(0.1),
            answered: 0,
        }
    }

    #[test]
    fn growth_is_measured_from_the_warmup_end_to_the_load_end() {
        let readings = [
            reading(0.0, Phase::Load, 100),
            reading(5.0, Phase::Load, 400),
            reading(10.0, Phase::Load, 500),
            reading(15.0, Phase::Load, 530),
            reading(20.0, Phase::Load, 525),
            reading(25.0, Phase::Tail, 900),
            reading(30.0, Phase::Drain, 300),
        ];
        let at = |seconds: f64, answered: u64| Warmup { seconds, answered };
        let g = rss_growth(&readings, at(8.0, 0)).unwrap();
        assert_eq!((g.warmup_end_s, g.end_s), (10.0, 20.0));
        assert_eq!(g.growth_bytes, 25 << 20);
        assert!((g.growth_pct - 5.0).abs() < 1e-9);
        assert_eq!(g.peak_bytes, 530 << 20);
        assert_eq!(
            rss_growth(&readings, at(20.0, 0)),
            None,
            "one reading after the warm-up"
        );
        // The warm-up also waits for answers: reading i has answered 10 * i.
        let mut counted = readings;
        counted
            .iter_mut()
            .enumerate()
            .for_each(|(i, r)| r.answered = 10 * i as u64);
        let g = rss_growth(&counted, at(0.0, 25)).unwrap();
        assert_eq!((g.warmup_end_s, g.end_s), (15.0, 20.0));
        assert_eq!(
            rss_growth(&counted, at(0.0, 41)),
            None,
            "never warm while the load was on"
        );
        let mut none = readings;
        none.iter_mut().for_each(|r| r.rss_bytes = None);
        assert_eq!(rss_growth(&none, at(0.0, 0)), None);
    }

    fn drain(running: f64) -> Drain {
        Drain {
            drained: running == 0.0,
            waited_s: 1.0,
            running: Some(running),
            waiting: Some(0.0),
            kv_usage: Some(0.0),
            rss_bytes: None,
        }
    }

    fn served() -> Counts {
        Counts {
            answered: 10,
            completed_stream: 10,
            ..Counts::default()
        }
    }

    fn failed(v: &Verdict) -> Vec<&'static str> {
        v.rules
            .iter()
            .filter(|r| r.check == Check::Fail)
            .map(|r| r.name)
            .collect()
    }

    #[test]
    fn each_rule_fails_on_its_own_evidence() {
        let counts = served();
        let g = RssGrowth {
            warmup_end_s: 10.0,
            warmup_end_bytes: 100 << 20,
            end_s: 20.0,
            end_bytes: 120 << 20,
            growth_bytes: 20 << 20,
            growth_pct: 20.0,
            peak_bytes: 120 << 20,
        };
        let base = Evidence {
            counts: &counts,
            server_5xx: Some(0),
            rss: Some(&g),
            warmup: Warmup {
                seconds: 10.0,
                answered: 0,
            },
            answered_under_load: 10,
            rss_measured: true,
            max_rss_growth: 25.0,
            drain: &drain(0.0),
        };
        let v = verdict(base);
        assert!(v.pass, "{v:#?}");
        assert_eq!(v.rules.len(), 7);
        assert_eq!(
            failed(&verdict(Evidence {
                max_rss_growth: 10.0,
                ..base
            })),
            ["rss_flat"]
        );
        assert_eq!(
            failed(&verdict(Evidence {
                server_5xx: Some(1),
                ..base
            })),
            ["no_5xx"]
        );
        let leaked = drain(1.0);
        assert_eq!(
            failed(&verdict(Evidence { drain: &leaked, ..base })),
            ["no_leaked_slot"]
        );
        let no_retry = Counts {
            refused_429: 3,
            refused_429_without_retry_after: 1,
            ..served()
        };
        assert_eq!(
            failed(&verdict(Evidence {
                counts: &no_retry,
                ..base
            })),
            ["refusals_are_429_with_retry_after"]
        );
        let bad = Counts {
            bad_accepted: 1,
            ..served()
        };
        assert_eq!(
            failed(&verdict(Evidence { counts: &bad, ..base })),
            ["bad_requests_get_their_4xx"]
        );
        let nothing = Counts::default();
        assert_eq!(
            failed(&verdict(Evidence {
                counts: &nothing,
                ..base
            })),
            ["served"]
        );
        let blind = Drain {
            running: None,
            ..drain(0.0)
        };
        let v = verdict(Evidence {
            rss: None,
            drain: &blind,
            ..base
        });
        assert!(v.pass);
        assert_eq!(
            v.rules.iter().filter(|r| r.check == Check::Skipped).count(),
            2,
            "{v:#?}"
        );
        assert!(v.rules[5].detail.contains("did not end"), "{}", v.rules[5].detail);
    }
}
