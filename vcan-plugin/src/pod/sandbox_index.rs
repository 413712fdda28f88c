//! The node's ready pod sandboxes, kept in memory by following containerd's task events, so that
//! PreStart finds a pod's network namespace without asking the runtime.
//!
//! The index is filled by one listing when the event stream opens (and again after every gap in
//! it) and by the events afterwards: a started task whose container record is a sandbox's (or, if
//! the record cannot be read, that the CRI describes as a ready sandbox) is added, an ended one
//! removed. Started tasks are described concurrently; an ID whose end was seen is never added back
//! by a description that returns later.
//!
//! It only ever answers from memory what the runtime would answer: a pod it does not know, a pod
//! with sandboxes of several UIDs, a namespace file that is gone, or an index out of step with the
//! runtime (stream closed, containerd restarting, CRI-O) all go to [`CriRuntime`] as before.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::Notify;

use crate::pod::container_record::{ContainerRecords, Record};
use crate::pod::resources::PodRef;
use crate::pod::runtime::{self, CriRuntime, Listed, RuntimeError, Sandbox, SandboxLookup};
use crate::pod::runtime_events::{self, EventsError, TaskEvent};

/// How long the subscription gets to reach containerd before the listing that the events then
/// keep current. containerd answers a subscription only with its first event, so there is no
/// acknowledgement to wait for; events of sandboxes that fall between are caught by the
/// reconcile pass (see [`SandboxLookup::ready_sandboxes`]) or answered by the runtime.
const SUBSCRIBE_SETTLE: Duration = Duration::from_millis(200);
/// When to ask again about a started task that was not (yet) a ready sandbox, counted from the
/// previous answer: the CRI records a sandbox as ready only after its task has started (and after
/// a database write, which takes a while on a slow disk). App containers' tasks are never
/// sandboxes, so the asking stops after the last of these.
const DESCRIBE_AGAIN_AFTER: [Duration; 4] = [
    Duration::from_millis(25),
    Duration::from_millis(50),
    Duration::from_millis(100),
    Duration::from_millis(250),
];
/// Longest a lookup that missed waits for started tasks being described before it asks the
/// runtime itself: about one description under load.
const DESCRIBE_WAIT: Duration = Duration::from_millis(300);
/// Ended IDs remembered (tasks of sandboxes and app containers alike).
const ENDED_KEPT: usize = 1024;
/// Waits between attempts to open the stream.
const RETRY_MIN: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// A sandbox in the index.
#[derive(Debug, Clone)]
struct Entry {
    pod: PodRef,
    created_at: i64,
    sandbox: Sandbox,
}

#[derive(Debug, Default)]
struct State {
    /// Whether the entries follow the runtime (the stream is open and the listing done).
    synced: bool,
    by_id: HashMap<String, Entry>,
    /// Started tasks being described now: a lookup that misses waits for them.
    describing: usize,
    /// Started tasks described once but not (yet) as a ready sandbox; asked again a moment later,
    /// or at once by a lookup that misses.
    waiting: HashSet<String>,
    /// Waiting tasks being described again on a lookup's behalf: other lookups wait for them.
    asking: HashSet<String>,
    /// IDs whose task ended, newest last: a description that returns after the end must not
    /// add the sandbox back.
    ended: VecDeque<String>,
}

impl State {
    fn has_ended(&self, id: &str) -> bool {
        self.ended.iter().any(|e| e == id)
    }
}

/// How the index has been doing, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IndexSample {
    /// Whether lookups are answered from memory now.
    pub synced: bool,
    /// Ready sandboxes known.
    pub sandboxes: usize,
    /// Lookups answered from memory.
    pub hits: u64,
    /// Lookups that asked the runtime.
    pub misses: u64,
    /// Full listings (stream opened or reopened).
    pub resyncs: u64,
    /// Sandboxes described from containerd's container record.
    pub described_by_record: u64,
    /// Sandboxes described by the CRI (the record could not be read).
    pub described_by_cri: u64,
}

/// What describing a started task found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Learned {
    /// A ready sandbox, now in the index (unless it ended meanwhile).
    Indexed,
    /// Not a ready sandbox yet, as far as the CRI can tell.
    NotYet,
    /// An app container's task, or a container gone: never a sandbox.
    NotSandbox,
}

/// Sandbox lookups from memory, falling back to the runtime; see the module documentation.
#[derive(Debug)]
pub struct SandboxIndex {
    runtime: CriRuntime,
    records: ContainerRecords,
    socket: PathBuf,
    state: Mutex<State>,
    /// Woken when a description finishes.
    described: Notify,
    hits: AtomicU64,
    misses: AtomicU64,
    resyncs: AtomicU64,
    by_record: AtomicU64,
    by_cri: AtomicU64,
}

impl SandboxIndex {
    /// An index of the sandboxes of the runtime at `socket` (containerd's, which serves both the
    /// CRI and the events API); empty and unused until [`SandboxIndex::run`] has listed them.
    pub fn new(socket: &Path) -> Self {
        SandboxIndex {
            runtime: CriRuntime::new(socket),
            records: ContainerRecords::new(socket),
            socket: socket.to_path_buf(),
            state: Mutex::new(State::default()),
            described: Notify::new(),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            resyncs: AtomicU64::new(0),
            by_record: AtomicU64::new(0),
            by_cri: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The map stays consistent whatever panicked while holding it.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// How the index has been doing.
    pub fn sample(&self) -> IndexSample {
        let state = self.lock();
        IndexSample {
            synced: state.synced,
            sandboxes: state.by_id.len(),
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            resyncs: self.resyncs.load(Ordering::Relaxed),
            described_by_record: self.by_record.load(Ordering::Relaxed),
            described_by_cri: self.by_cri.load(Ordering::Relaxed),
        }
    }

    /// `pod`'s sandbox from memory, if the index can tell it for certain.
    fn remembered(&self, pod: &PodRef) -> Option<Sandbox> {
        let entries: Vec<(String, Entry)> = {
            let state = self.lock();
            if !state.synced {
                return None;
            }
            state
                .by_id
                .iter()
                .filter(|(_, e)| &e.pod == pod)
                .map(|(id, e)| (id.clone(), e.clone()))
                .collect()
        };
        // A sandbox whose namespace file is gone has stopped, whatever the events said so far.
        let alive: Vec<&Entry> = entries
            .iter()
            .map(|(_, e)| e)
            .filter(|e| e.sandbox.netns.as_ref().is_none_or(|p| p.exists()))
            .collect();
        let listed: Vec<Listed> = alive
            .iter()
            .map(|e| Listed {
                id: e.sandbox.id.clone(),
                uid: e.sandbox.uid.clone(),
                created_at: e.created_at,
            })
            .collect();
        let chosen = runtime::choose(pod, &listed).ok()?;
        alive
            .iter()
            .find(|e| e.sandbox.id == chosen.id)
            .map(|e| e.sandbox.clone())
    }

    /// `pod`'s sandbox from memory; if it is not there, once the started tasks being described
    /// are, and once those described too early to be ready sandboxes have been asked again (or
    /// [`DESCRIBE_WAIT`] has passed). The kubelet calls PreStart only after RunPodSandbox has
    /// returned, so by now the CRI knows the pod's sandbox as ready.
    async fn remembered_soon(&self, pod: &PodRef) -> Option<Sandbox> {
        let deadline = tokio::time::Instant::now() + DESCRIBE_WAIT;
        let mut asked = HashSet::new();
        loop {
            let described = self.described.notified();
            if let Some(sandbox) = self.remembered(pod) {
                return Some(sandbox);
            }
            let (ask, busy) = {
                let mut state = self.lock();
                if !state.synced {
                    return None;
                }
                let ask: Vec<String> = state
                    .waiting
                    .iter()
                    .filter(|id| !state.asking.contains(*id) && !asked.contains(*id))
                    .cloned()
                    .collect();
                state.asking.extend(ask.iter().cloned());
                (ask, state.describing > 0 || !state.asking.is_empty())
            };
            if !ask.is_empty() {
                let again = futures::future::join_all(ask.iter().map(|id| self.learn(id)));
                let _ = tokio::time::timeout_at(deadline, again).await;
                {
                    let mut state = self.lock();
                    for id in &ask {
                        state.asking.remove(id);
                    }
                }
                asked.extend(ask);
                self.described.notify_waiters();
                continue;
            }
            if !busy {
                return None;
            }
            if tokio::time::timeout_at(deadline, described).await.is_err() {
                return self.remembered(pod);
            }
        }
    }

    fn set_unsynced(&self) {
        let mut state = self.lock();
        state.synced = false;
        state.by_id.clear();
        state.ended.clear();
        state.waiting.clear();
    }

    fn forget(&self, id: &str) {
        let mut state = self.lock();
        if state.by_id.remove(id).is_some() {
            tracing::debug!(sandbox = id, "sandbox ended; removed from the index");
        }
        state.waiting.remove(id);
        if state.ended.len() == ENDED_KEPT {
            state.ended.pop_front();
        }
        state.ended.push_back(id.to_string());
    }

    /// Describes `id` (from its container record, else by the CRI) and records it if it is a
    /// ready sandbox that has not ended meanwhile.
    async fn learn(&self, id: &str) -> Result<Learned, RuntimeError> {
        let described = match self.records.describe(id).await {
            Ok(Record::Sandbox(d)) => {
                self.by_record.fetch_add(1, Ordering::Relaxed);
                Some(d)
            }
            Ok(Record::NotSandbox) => return Ok(Learned::NotSandbox),
            Err(e) => {
                tracing::debug!(error = %e, "describing the sandbox through the CRI instead");
                let described = self.runtime.describe(id).await?;
                if described.is_some() {
                    self.by_cri.fetch_add(1, Ordering::Relaxed);
                }
                described
            }
        };
        match described {
            Some(d) if d.ready => {
                let mut state = self.lock();
                state.waiting.remove(id);
                if !state.has_ended(id) {
                    tracing::debug!(sandbox = id, pod = %d.pod, "sandbox started; indexed");
                    state.by_id.insert(
                        id.to_string(),
                        Entry {
                            pod: d.pod,
                            created_at: d.created_at,
                            sandbox: d.sandbox,
                        },
                    );
                }
                Ok(Learned::Indexed)
            }
            _ => Ok(Learned::NotYet),
        }
    }

    /// Describes the started task `id` on a task of its own, so that many pods starting at once
    /// are described at once; while it is not a ready sandbox, asks again a little later (a
    /// lookup that misses meanwhile asks at once, see [`SandboxIndex::remembered_soon`]).
    fn describe_started(self: &Arc<Self>, id: String) {
        {
            let mut state = self.lock();
            if state.by_id.contains_key(&id) {
                return;
            }
            state.describing += 1;
        }
        let index = self.clone();
        tokio::spawn(async move {
            let mut learned = index.learn(&id).await;
            {
                let mut state = index.lock();
                state.describing -= 1;
                if matches!(learned, Ok(Learned::NotYet)) && !state.has_ended(&id) {
                    state.waiting.insert(id.clone());
                }
            }
            index.described.notify_waiters();
            for delay in DESCRIBE_AGAIN_AFTER {
                if !matches!(learned, Ok(Learned::NotYet)) {
                    break;
                }
                tokio::time::sleep(delay).await;
                if !index.lock().waiting.contains(&id) {
                    // Indexed on a lookup's behalf, or ended.
                    return;
                }
                learned = index.learn(&id).await;
            }
            if let Err(e) = learned {
                tracing::debug!(error = %e, "cannot describe a started task");
            }
            index.lock().waiting.remove(&id);
        });
    }

    /// Lists every ready sandbox, describes those not yet known and drops those gone.
    async fn resync(&self) -> Result<(), RuntimeError> {
        let listed = self.runtime.list_ready(None).await?;
        let ready: HashSet<&str> = listed.iter().map(|(_, l)| l.id.as_str()).collect();
        let unknown: Vec<String> = {
            let mut state = self.lock();
            state.by_id.retain(|id, _| ready.contains(id.as_str()));
            ready
                .iter()
                .filter(|id| !state.by_id.contains_key(**id))
                .map(|id| (*id).to_string())
                .collect()
        };
        for id in unknown {
            self.learn(&id).await?;
        }
        self.resyncs.fetch_add(1, Ordering::Relaxed);
        self.lock().synced = true;
        Ok(())
    }

    /// Keeps the index current for as long as the plugin runs: opens containerd's event stream,
    /// lists, follows the events, and starts over after every gap. Returns only if the runtime
    /// has no events API, leaving every lookup to the runtime.
    pub async fn run(self: Arc<Self>) {
        let mut retry = RETRY_MIN;
        loop {
            self.set_unsynced();
            let subscription = runtime_events::subscribe(&self.socket);
            tokio::pin!(subscription);
            let early = tokio::time::timeout(SUBSCRIBE_SETTLE, &mut subscription)
                .await
                .ok();
            if let Some(Err(e)) = &early {
                if matches!(e, EventsError::Unsupported(_)) {
                    tracing::info!(error = %e, "no sandbox index: every PreStart asks the runtime");
                    return;
                }
                tracing::debug!(error = %e, "cannot follow the runtime's events yet");
                tokio::time::sleep(retry).await;
                retry = (retry * 2).min(RETRY_MAX);
                continue;
            }
            if let Err(e) = self.resync().await {
                tracing::debug!(error = %e, "cannot list the runtime's sandboxes yet");
                tokio::time::sleep(retry).await;
                retry = (retry * 2).min(RETRY_MAX);
                continue;
            }
            tracing::info!(
                sandboxes = self.lock().by_id.len(),
                "following the runtime's events; sandbox lookups answered from memory"
            );
            let opened = match early {
                Some(opened) => opened,
                None => subscription.await,
            };
            let mut events = match opened {
                Ok(events) => Box::pin(events),
                Err(e) => {
                    tracing::info!(error = %e, "the runtime's event stream closed; sandbox lookups ask the runtime until it is back");
                    continue;
                }
            };
            retry = RETRY_MIN;
            loop {
                match events.next().await {
                    Some(Ok(TaskEvent::Started(id))) => self.describe_started(id),
                    Some(Ok(TaskEvent::Ended(id))) => self.forget(&id),
                    Some(Err(e)) => {
                        tracing::info!(error = %e, "the runtime's event stream failed; sandbox lookups ask the runtime until it is back");
                        break;
                    }
                    None => {
                        tracing::info!(
                            "the runtime's event stream ended; sandbox lookups ask the runtime until it is back"
                        );
                        break;
                    }
                }
            }
        }
    }
}

#[async_trait::async_trait]
impl SandboxLookup for SandboxIndex {
    async fn sandbox(&self, pod: &PodRef) -> Result<Sandbox, RuntimeError> {
        if let Some(sandbox) = self.remembered_soon(pod).await {
            self.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(sandbox);
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        self.runtime.sandbox(pod).await
    }

    /// The runtime's own answer, always: reconcile releases pods by it. Entries it does not list
    /// are dropped (a sandbox that stopped while the stream was being opened).
    async fn ready_sandboxes(&self) -> Result<HashSet<String>, RuntimeError> {
        let ready = self.runtime.ready_sandboxes().await?;
        self.lock().by_id.retain(|id, _| ready.contains(id));
        Ok(ready)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str) -> PodRef {
        PodRef {
            namespace: "default".into(),
            name: name.into(),
        }
    }

    fn entry(name: &str, id: &str, uid: &str, created_at: i64, netns: Option<PathBuf>) -> Entry {
        Entry {
            pod: pod(name),
            created_at,
            sandbox: Sandbox {
                id: id.into(),
                uid: uid.into(),
                netns,
                annotations: HashMap::new(),
            },
        }
    }

    fn index(entries: Vec<Entry>, synced: bool) -> SandboxIndex {
        let index = SandboxIndex::new(Path::new("/nonexistent/containerd.sock"));
        {
            let mut state = index.lock();
            state.synced = synced;
            for e in entries {
                state.by_id.insert(e.sandbox.id.clone(), e);
            }
        }
        index
    }

    // Tokio tests: the runtime's gRPC channel needs a runtime even when it is never used.
    #[tokio::test]
    async fn a_known_pod_is_answered_from_memory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let old = dir.path().join("cni-old");
        let new = dir.path().join("cni-new");
        std::fs::write(&old, b"").expect("netns file");
        std::fs::write(&new, b"").expect("netns file");
        let index = index(
            vec![
                entry("a", "sb-old", "u1", 1, Some(old)),
                entry("a", "sb-new", "u1", 2, Some(new.clone())),
                entry("b", "sb-b", "u2", 1, None),
            ],
            true,
        );
        let got = index.remembered(&pod("a")).expect("known");
        assert_eq!((got.id.as_str(), got.netns), ("sb-new", Some(new)));
        assert_eq!(
            index.remembered(&pod("b")).expect("host network").netns,
            None
        );
        assert!(index.remembered(&pod("c")).is_none());
    }

    #[tokio::test]
    async fn a_lookup_asks_again_about_waiting_tasks_once_and_never_hangs() {
        let index = index(Vec::new(), true);
        index.lock().waiting.insert("task-1".into());
        let started = std::time::Instant::now();
        // The runtime cannot be reached: the task is asked about, and the lookup gives up.
        assert!(index.remembered_soon(&pod("a")).await.is_none());
        assert!(
            started.elapsed() < DESCRIBE_WAIT * 2,
            "{:?}",
            started.elapsed()
        );
        let state = index.lock();
        assert!(state.asking.is_empty(), "{:?}", state.asking);
        assert!(state.waiting.contains("task-1"));
    }

    #[tokio::test]
    async fn doubt_goes_to_the_runtime() {
        let dir = tempfile::tempdir().expect("tempdir");
        let live = dir.path().join("cni-live");
        std::fs::write(&live, b"").expect("netns file");
        let gone = dir.path().join("cni-gone");
        let entries = vec![
            // Two pods under one name: the runtime decides (and refuses).
            entry("twins", "sb-1", "u1", 1, Some(live.clone())),
            entry("twins", "sb-2", "u2", 2, Some(live.clone())),
            // Its namespace file is gone: stopped, whatever the events said so far.
            entry("stopped", "sb-3", "u3", 1, Some(gone.clone())),
        ];
        let synced = index(entries.clone(), true);
        assert!(synced.remembered(&pod("twins")).is_none());
        assert!(synced.remembered(&pod("stopped")).is_none());
        // The namespace of the old sandbox is gone: the new one is certain.
        let replaced = index(
            vec![
                entry("r", "sb-old", "u-old", 1, Some(gone)),
                entry("r", "sb-new", "u-new", 2, Some(live)),
            ],
            true,
        );
        assert_eq!(
            replaced.remembered(&pod("r")).expect("the live one").id,
            "sb-new"
        );
        // Out of step with the runtime: nothing is answered from memory.
        let unsynced = index(entries, false);
        assert!(unsynced.remembered(&pod("twins")).is_none());
    }
}
