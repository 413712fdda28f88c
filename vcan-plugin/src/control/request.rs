//! The control socket's messages: what a client may ask ([`Request`]), what the daemon answers
//! ([`Reply`]), their JSON form and their validation.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Longest a fault may last (and longest a bus-off member waits before restarting): a fault
/// forgotten by a crashed pipeline must end by itself, and a test that needs longer can inject
/// again.
pub const MAX_FAULT_DURATION: Duration = Duration::from_secs(3600);

/// Longest bus name accepted, as the bus configuration allows (see [`crate::bus::config`]).
pub const MAX_BUS_NAME_LEN: usize = 53;

/// Which members of a bus a fault affects.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Target {
    /// Every member of the bus.
    All,
    /// The one member pod.
    Pod {
        /// The pod's namespace.
        namespace: String,
        /// The pod's name.
        name: String,
    },
}

impl Target {
    /// The pod written as `namespace/name`, as on the command line.
    pub fn pod(s: &str) -> Result<Target, RequestError> {
        let target = match s.split_once('/') {
            Some((namespace, name)) => Target::Pod {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
            },
            None => return Err(RequestError::PodForm(s.to_owned())),
        };
        target.validate()?;
        Ok(target)
    }

    /// Checks that a pod target names a pod.
    pub fn validate(&self) -> Result<(), RequestError> {
        match self {
            Target::All => Ok(()),
            Target::Pod { namespace, name } => {
                let part_ok = |s: &str| {
                    !s.is_empty() && !s.contains('/') && !s.chars().any(char::is_whitespace)
                };
                if part_ok(namespace) && part_ok(name) {
                    Ok(())
                } else {
                    Err(RequestError::PodForm(format!("{namespace}/{name}")))
                }
            }
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::All => f.write_str("all members"),
            Target::Pod { namespace, name } => write!(f, "{namespace}/{name}"),
        }
    }
}

/// How a bus misbehaves.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum FaultKind {
    /// The member's controller goes error-warning → error-passive → bus-off; after `restart` it
    /// restarts (error-active again).
    BusOff {
        /// How long the controller stays bus-off.
        #[serde(rename = "restart_ms", with = "millis")]
        restart: Duration,
    },
    /// Nothing sent or received by the member(s) for `duration`.
    Disconnect {
        /// How long.
        #[serde(rename = "duration_ms", with = "millis")]
        duration: Duration,
    },
    /// Frames sent or received by the member(s) dropped with `probability` (0 < p ≤ 1) for
    /// `duration`.
    Drop {
        /// The chance that a frame is dropped.
        probability: f64,
        /// How long.
        #[serde(rename = "duration_ms", with = "millis")]
        duration: Duration,
    },
    /// One payload bit flipped with `probability` for `duration` (frames without payload pass
    /// unchanged).
    Corrupt {
        /// The chance that a frame has a bit flipped.
        probability: f64,
        /// How long.
        #[serde(rename = "duration_ms", with = "millis")]
        duration: Duration,
    },
    /// Frames to the member(s) delivered `latency` ± uniform `jitter` late for `duration`.
    Delay {
        /// The mean delay.
        #[serde(rename = "latency_ms", with = "millis")]
        latency: Duration,
        /// The largest deviation from `latency`, either way.
        #[serde(rename = "jitter_ms", with = "millis", default)]
        jitter: Duration,
        /// How long.
        #[serde(rename = "duration_ms", with = "millis")]
        duration: Duration,
    },
}

/// A fault's parameters as given on the command line, each optional: which ones a kind needs
/// is decided by [`FaultKind::from_params`].
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct FaultParams {
    /// `--restart-ms`.
    pub restart_ms: Option<u64>,
    /// `--duration-ms`.
    pub duration_ms: Option<u64>,
    /// `--probability`.
    pub probability: Option<f64>,
    /// `--latency-ms`.
    pub latency_ms: Option<u64>,
    /// `--jitter-ms`.
    pub jitter_ms: Option<u64>,
}

impl FaultKind {
    /// Every kind's label, as [`FaultKind::label`] gives them (metric label values).
    pub const LABELS: [&str; 5] = ["bus_off", "disconnect", "drop", "corrupt", "delay"];

    /// The kind's name in metrics and JSON: `bus_off`, `disconnect`, `drop`, `corrupt`, `delay`.
    pub fn label(&self) -> &'static str {
        match self {
            FaultKind::BusOff { .. } => "bus_off",
            FaultKind::Disconnect { .. } => "disconnect",
            FaultKind::Drop { .. } => "drop",
            FaultKind::Corrupt { .. } => "corrupt",
            FaultKind::Delay { .. } => "delay",
        }
    }

    /// The fault of kind `label` (one of [`FaultKind::LABELS`]; `-` may stand for `_`) from
    /// command-line parameters, validated. A parameter the kind needs but lacks, or one it
    /// does not take, is an error rather than a default: a pipeline that writes
    /// `--probability` for a bus-off fault has misunderstood something.
    pub fn from_params(label: &str, params: &FaultParams) -> Result<FaultKind, RequestError> {
        let label = label.replace('-', "_");
        let (kind, takes): (FaultKind, &[&str]) = match label.as_str() {
            "bus_off" => (
                FaultKind::BusOff {
                    restart: required(&label, "--restart-ms", params.restart_ms)?,
                },
                &["--restart-ms"],
            ),
            "disconnect" => (
                FaultKind::Disconnect {
                    duration: required(&label, "--duration-ms", params.duration_ms)?,
                },
                &["--duration-ms"],
            ),
            "drop" | "corrupt" => {
                let probability =
                    params
                        .probability
                        .ok_or_else(|| RequestError::MissingParameter {
                            kind: label.clone(),
                            flag: "--probability",
                        })?;
                let duration = required(&label, "--duration-ms", params.duration_ms)?;
                let kind = if label == "drop" {
                    FaultKind::Drop {
                        probability,
                        duration,
                    }
                } else {
                    FaultKind::Corrupt {
                        probability,
                        duration,
                    }
                };
                (kind, &["--probability", "--duration-ms"])
            }
            "delay" => (
                FaultKind::Delay {
                    latency: required(&label, "--latency-ms", params.latency_ms)?,
                    jitter: Duration::from_millis(params.jitter_ms.unwrap_or(0)),
                    duration: required(&label, "--duration-ms", params.duration_ms)?,
                },
                &["--latency-ms", "--jitter-ms", "--duration-ms"],
            ),
            _ => return Err(RequestError::UnknownKind(label)),
        };
        let given = [
            ("--restart-ms", params.restart_ms.is_some()),
            ("--duration-ms", params.duration_ms.is_some()),
            ("--probability", params.probability.is_some()),
            ("--latency-ms", params.latency_ms.is_some()),
            ("--jitter-ms", params.jitter_ms.is_some()),
        ];
        if let Some((flag, _)) = given
            .into_iter()
            .find(|(flag, given)| *given && !takes.contains(flag))
        {
            return Err(RequestError::UnusedParameter { kind: label, flag });
        }
        kind.validate()?;
        Ok(kind)
    }

    /// Checks the parameters against the limits.
    pub fn validate(&self) -> Result<(), RequestError> {
        match *self {
            FaultKind::BusOff { restart } => check_duration("restart_ms", restart),
            FaultKind::Disconnect { duration } => check_duration("duration_ms", duration),
            FaultKind::Drop {
                probability,
                duration,
            }
            | FaultKind::Corrupt {
                probability,
                duration,
            } => {
                // Written so that NaN fails too.
                if !(probability > 0.0 && probability <= 1.0) {
                    return Err(RequestError::Probability(probability));
                }
                check_duration("duration_ms", duration)
            }
            FaultKind::Delay {
                latency,
                jitter,
                duration,
            } => {
                check_duration("latency_ms", latency)?;
                check_duration("duration_ms", duration)?;
                if jitter > latency {
                    return Err(RequestError::Jitter { jitter, latency });
                }
                Ok(())
            }
        }
    }
}

impl fmt::Display for FaultKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FaultKind::BusOff { restart } => {
                write!(f, "bus-off, restart after {}", human_duration(*restart))
            }
            FaultKind::Disconnect { duration } => {
                write!(f, "disconnect for {}", human_duration(*duration))
            }
            FaultKind::Drop {
                probability,
                duration,
            } => write!(f, "drop p={probability} for {}", human_duration(*duration)),
            FaultKind::Corrupt {
                probability,
                duration,
            } => write!(
                f,
                "corrupt p={probability} for {}",
                human_duration(*duration)
            ),
            FaultKind::Delay {
                latency,
                jitter,
                duration,
            } => write!(
                f,
                "delay {} ± {} for {}",
                human_duration(*latency),
                human_duration(*jitter),
                human_duration(*duration)
            ),
        }
    }
}

/// A fault to start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Inject {
    /// The timed bus's name.
    pub bus: String,
    /// Whom it affects.
    pub target: Target,
    /// What happens.
    pub kind: FaultKind,
}

/// What a client asks the daemon.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Start a fault.
    Inject(Inject),
    /// End faults early.
    Clear {
        /// The bus.
        bus: String,
        /// Whose faults: `None` ends every fault on the bus, `Some(Target::All)` those injected
        /// for all members, `Some(Target::Pod { .. })` those of the one pod.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        target: Option<Target>,
    },
    /// Show the active faults, of one bus or of all.
    List {
        /// The bus, or `None` for every bus.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        bus: Option<String>,
    },
}

impl Request {
    /// Checks the request against the limits; the server answers an invalid request with this
    /// error and does not pass it on.
    pub fn validate(&self) -> Result<(), RequestError> {
        match self {
            Request::Inject(inject) => {
                check_bus(&inject.bus)?;
                inject.target.validate()?;
                inject.kind.validate()
            }
            Request::Clear { bus, target } => {
                check_bus(bus)?;
                target.as_ref().map_or(Ok(()), Target::validate)
            }
            Request::List { bus } => bus.as_deref().map_or(Ok(()), check_bus),
        }
    }
}

/// An active fault as listed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActiveFault {
    /// The bus.
    pub bus: String,
    /// Whom it affects.
    pub target: Target,
    /// What happens.
    pub kind: FaultKind,
    /// How long until it ends by itself (for bus-off: until the restart).
    #[serde(rename = "remaining_ms", with = "millis")]
    pub remaining: Duration,
}

impl fmt::Display for ActiveFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {}: {}, {} left",
            self.bus,
            self.target,
            self.kind,
            human_duration(self.remaining)
        )
    }
}

/// The daemon's answer to one request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case", deny_unknown_fields)]
pub enum Reply {
    /// Done.
    Ok {
        /// What was done, for people.
        message: String,
        /// The active faults concerned: all listed ones, or those just injected.
        #[serde(default)]
        faults: Vec<ActiveFault>,
    },
    /// Not done.
    Error {
        /// What is wrong and what to do about it.
        message: String,
    },
}

impl Reply {
    /// An error reply with `message`.
    pub fn error(message: impl fmt::Display) -> Reply {
        Reply::Error {
            message: message.to_string(),
        }
    }
}

/// Why a request is invalid.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RequestError {
    /// The bus name is empty or too long.
    #[error(
        "bus name {0:?} is invalid: give the name of a timed bus of the bus configuration \
         (at most {MAX_BUS_NAME_LEN} characters)"
    )]
    BusName(String),
    /// A pod is not written `namespace/name`.
    #[error("pod {0:?} is not in namespace/name form: write e.g. default/ecu-a")]
    PodForm(String),
    /// A probability is outside (0, 1].
    #[error(
        "probability {0} is out of range: give a number above 0 and at most 1 (e.g. 0.1 for \
         one frame in ten)"
    )]
    Probability(f64),
    /// A duration is zero or too long.
    #[error(
        "{field} {millis} is out of range: give at least 1 and at most {max} milliseconds \
         (inject again for a longer fault)",
        max = MAX_FAULT_DURATION.as_millis()
    )]
    Duration {
        /// The parameter.
        field: &'static str,
        /// Its value in milliseconds.
        millis: u128,
    },
    /// The jitter exceeds the latency, which would deliver frames before they were sent.
    #[error(
        "jitter {} exceeds latency {}: a frame cannot arrive before it was sent; lower the \
         jitter or raise the latency",
        human_duration(*jitter), human_duration(*latency)
    )]
    Jitter {
        /// The jitter.
        jitter: Duration,
        /// The latency.
        latency: Duration,
    },
    /// A fault kind is not known.
    #[error("unknown fault kind {0:?}: use one of bus-off, disconnect, drop, corrupt, delay")]
    UnknownKind(String),
    /// A kind lacks a parameter it needs.
    #[error("a {kind} fault needs {flag}")]
    MissingParameter {
        /// The kind's label.
        kind: String,
        /// The missing flag.
        flag: &'static str,
    },
    /// A parameter was given that the kind does not take.
    #[error("{flag} does not apply to a {kind} fault: leave it out")]
    UnusedParameter {
        /// The kind's label.
        kind: String,
        /// The flag given.
        flag: &'static str,
    },
}

fn required(kind: &str, flag: &'static str, value: Option<u64>) -> Result<Duration, RequestError> {
    value
        .map(Duration::from_millis)
        .ok_or_else(|| RequestError::MissingParameter {
            kind: kind.to_owned(),
            flag,
        })
}

fn check_duration(field: &'static str, d: Duration) -> Result<(), RequestError> {
    if d.is_zero() || d > MAX_FAULT_DURATION {
        return Err(RequestError::Duration {
            field,
            millis: d.as_millis(),
        });
    }
    Ok(())
}

fn check_bus(bus: &str) -> Result<(), RequestError> {
    if bus.trim().is_empty() || bus.len() > MAX_BUS_NAME_LEN {
        return Err(RequestError::BusName(bus.to_owned()));
    }
    Ok(())
}

/// A duration for people: milliseconds below 10 s, seconds with one decimal above.
pub fn human_duration(d: Duration) -> String {
    if d < Duration::from_secs(10) {
        format!("{} ms", millis::ceil(d))
    } else {
        format!("{:.1} s", d.as_secs_f64())
    }
}

/// Durations as integer milliseconds on the wire.
mod millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    /// Rounded up, so that a fault with 0.3 ms left is not listed as having none.
    pub(super) fn ceil(d: Duration) -> u64 {
        u64::try_from(d.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX)
    }

    pub(super) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(ceil(*d))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod() -> Target {
        Target::Pod {
            namespace: "default".into(),
            name: "ecu-a".into(),
        }
    }

    #[test]
    fn requests_have_the_documented_json_shape() {
        let inject = Request::Inject(Inject {
            bus: "chassis".into(),
            target: pod(),
            kind: FaultKind::BusOff {
                restart: Duration::from_millis(200),
            },
        });
        let json = serde_json::to_string(&inject).expect("serializes");
        assert_eq!(
            json,
            r#"{"op":"inject","bus":"chassis","target":{"pod":{"namespace":"default","name":"ecu-a"}},"kind":{"type":"bus_off","restart_ms":200}}"#
        );
        assert_eq!(
            serde_json::from_str::<Request>(&json).expect("parses"),
            inject
        );

        let delay = r#"{"op":"inject","bus":"body","target":"all","kind":{"type":"delay","latency_ms":20,"duration_ms":5000}}"#;
        assert_eq!(
            serde_json::from_str::<Request>(delay).expect("parses"),
            Request::Inject(Inject {
                bus: "body".into(),
                target: Target::All,
                kind: FaultKind::Delay {
                    latency: Duration::from_millis(20),
                    jitter: Duration::ZERO,
                    duration: Duration::from_secs(5),
                },
            })
        );

        let clear = Request::Clear {
            bus: "chassis".into(),
            target: None,
        };
        assert_eq!(
            serde_json::to_string(&clear).expect("serializes"),
            r#"{"op":"clear","bus":"chassis"}"#
        );
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"op":"list"}"#).expect("parses"),
            Request::List { bus: None }
        );
    }

    #[test]
    fn replies_have_the_documented_json_shape() {
        let reply = Reply::Ok {
            message: "1 fault".into(),
            faults: vec![ActiveFault {
                bus: "chassis".into(),
                target: Target::All,
                kind: FaultKind::Drop {
                    probability: 0.25,
                    duration: Duration::from_secs(2),
                },
                remaining: Duration::from_micros(1_500_300),
            }],
        };
        assert_eq!(
            serde_json::to_string(&reply).expect("serializes"),
            r#"{"status":"ok","message":"1 fault","faults":[{"bus":"chassis","target":"all","kind":{"type":"drop","probability":0.25,"duration_ms":2000},"remaining_ms":1501}]}"#
        );
        assert_eq!(
            serde_json::to_string(&Reply::error("no bus x")).expect("serializes"),
            r#"{"status":"error","message":"no bus x"}"#
        );
    }

    #[test]
    fn misspelt_fields_are_refused_rather_than_ignored() {
        // A clear with a misspelt target would otherwise clear every fault on the bus.
        let err =
            serde_json::from_str::<Request>(r#"{"op":"clear","bus":"chassis","targett":"all"}"#)
                .expect_err("refused");
        assert!(err.to_string().contains("targett"), "{err}");
        serde_json::from_str::<Request>(
            r#"{"op":"inject","bus":"b","target":"all","kind":{"type":"disconnect","duration":5}}"#,
        )
        .expect_err("refused");
    }

    #[test]
    fn labels_match_the_kinds() {
        let d = Duration::from_millis(1);
        let kinds = [
            FaultKind::BusOff { restart: d },
            FaultKind::Disconnect { duration: d },
            FaultKind::Drop {
                probability: 1.0,
                duration: d,
            },
            FaultKind::Corrupt {
                probability: 1.0,
                duration: d,
            },
            FaultKind::Delay {
                latency: d,
                jitter: d,
                duration: d,
            },
        ];
        let labels: Vec<_> = kinds.iter().map(FaultKind::label).collect();
        assert_eq!(labels, FaultKind::LABELS);
        for kind in &kinds {
            let json = serde_json::to_value(kind).expect("serializes");
            assert_eq!(json["type"], kind.label());
        }
    }

    #[test]
    fn pods_must_be_namespace_slash_name() {
        assert_eq!(Target::pod("default/ecu-a"), Ok(pod()));
        for bad in ["ecu-a", "/ecu-a", "default/", "a/b/c", "de fault/x", ""] {
            let err = Target::pod(bad).expect_err(bad);
            assert!(
                err.to_string().contains("namespace/name form"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn limits_are_enforced_with_explanations() {
        let p = |probability| FaultKind::Drop {
            probability,
            duration: Duration::from_secs(1),
        };
        assert!(p(1.0).validate().is_ok());
        assert!(p(0.001).validate().is_ok());
        for bad in [0.0, -0.5, 1.01, f64::NAN] {
            let err = p(bad).validate().expect_err("refused");
            assert!(err.to_string().contains("above 0 and at most 1"), "{err}");
        }

        for bad in [
            Duration::ZERO,
            MAX_FAULT_DURATION + Duration::from_millis(1),
        ] {
            let err = FaultKind::Disconnect { duration: bad }
                .validate()
                .expect_err("refused");
            assert!(err.to_string().starts_with("duration_ms "), "{err}");
            assert!(err.to_string().contains("at most 3600000"), "{err}");
        }
        assert!(
            FaultKind::BusOff {
                restart: MAX_FAULT_DURATION
            }
            .validate()
            .is_ok()
        );

        let jitter = FaultKind::Delay {
            latency: Duration::from_millis(10),
            jitter: Duration::from_millis(11),
            duration: Duration::from_secs(1),
        };
        let err = jitter.validate().expect_err("refused");
        assert!(
            err.to_string()
                .contains("jitter 11 ms exceeds latency 10 ms"),
            "{err}"
        );

        let empty_bus = Request::List {
            bus: Some(String::new()),
        };
        assert!(matches!(
            empty_bus.validate(),
            Err(RequestError::BusName(_))
        ));
        let bad_pod = Request::Clear {
            bus: "b".into(),
            target: Some(Target::Pod {
                namespace: "default".into(),
                name: String::new(),
            }),
        };
        assert!(matches!(bad_pod.validate(), Err(RequestError::PodForm(_))));
    }

    #[test]
    fn command_line_parameters_make_kinds() {
        let params = FaultParams {
            restart_ms: Some(200),
            ..FaultParams::default()
        };
        assert_eq!(
            FaultKind::from_params("bus-off", &params),
            Ok(FaultKind::BusOff {
                restart: Duration::from_millis(200)
            })
        );
        let delay = FaultParams {
            latency_ms: Some(30),
            jitter_ms: Some(5),
            duration_ms: Some(1000),
            ..FaultParams::default()
        };
        assert_eq!(
            FaultKind::from_params("delay", &delay),
            Ok(FaultKind::Delay {
                latency: Duration::from_millis(30),
                jitter: Duration::from_millis(5),
                duration: Duration::from_secs(1),
            })
        );

        let err = FaultKind::from_params("drop", &FaultParams::default()).expect_err("refused");
        assert_eq!(err.to_string(), "a drop fault needs --probability");
        let extra = FaultParams {
            probability: Some(0.5),
            ..params
        };
        let err = FaultKind::from_params("bus_off", &extra).expect_err("refused");
        assert_eq!(
            err.to_string(),
            "--probability does not apply to a bus_off fault: leave it out"
        );
        let zero = FaultParams {
            duration_ms: Some(0),
            ..FaultParams::default()
        };
        assert!(matches!(
            FaultKind::from_params("disconnect", &zero),
            Err(RequestError::Duration { .. })
        ));
        assert!(matches!(
            FaultKind::from_params("reorder", &zero),
            Err(RequestError::UnknownKind(_))
        ));
    }

    #[test]
    fn faults_read_well() {
        let fault = ActiveFault {
            bus: "chassis".into(),
            target: pod(),
            kind: FaultKind::Delay {
                latency: Duration::from_millis(20),
                jitter: Duration::from_millis(5),
                duration: Duration::from_secs(60),
            },
            remaining: Duration::from_millis(41_260),
        };
        assert_eq!(
            fault.to_string(),
            "chassis: default/ecu-a: delay 20 ms ± 5 ms for 60.0 s, 41.3 s left"
        );
    }
}
