//! Many records of one member fed at once (`hie import`, batch Bundles, concurrent feeds).
//!
//! The decisions are those of the online feed: each record is matched, in order, against every
//! record stored before it and every earlier record of the batch, with the same blocking keys,
//! weights, thresholds and hazard rules (`evaluate`). What changes is the work around them:
//! candidates of the whole batch are looked up with a few set-at-a-time queries instead of two
//! per record, the rows are written with multi-row inserts (index entries sorted), and the
//! batch is written in one transaction (`hie import` puts several batches in one).
//!
//! Records the batch path does not decide alone take the online path, one by one, after the
//! batch's new records and in the same transaction: updates of stored records, a second record
//! under an identifier already in the batch, merges (`link` replaced-by), and records whose
//! match would merge two identities.
//!
//! Matching and writing are separate steps (`Matcher`, `write_group`), so that a `Pipeline`
//! can match the next batch while the last is written; see ARCHITECTURE.md, "The pipeline".

use serde_json::{json, Value};
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use super::normalize::{Demographics, KeyId};
use super::score::{Score, Sketch};
use super::{
    content, evaluate_scored, feed_in, golden, indexed_identifiers, replaced_by, review_score,
    validate_feed, Candidate, Evaluation, FeedRequest, FeedResult, MpiSettings,
};
use crate::db::mpi::{self as store, BulkRows, IdTable, NewDecision, NewHistory, NewIdentity};
use crate::db::mpi::{NewReview, NewSource, SourceContent};
use crate::db::{self, DbConn};
use crate::error::{Error, Result};
use crate::orgs::Organization;

/// The identifier a Patient is stored under: its first identifier in a system `org` owns.
pub fn own_identifier(org: &Organization, patient: &Value) -> Result<(String, String)> {
    patient
        .get("identifier")
        .and_then(Value::as_array)
        .and_then(|ids| {
            ids.iter().find_map(|id| {
                let s = id.get("system")?.as_str()?;
                let v = id.get("value")?.as_str()?;
                org.identifier_systems
                    .iter()
                    .any(|o| o == s)
                    .then(|| (s.to_string(), v.trim().to_string()))
            })
        })
        .ok_or_else(|| {
            Error::invalid(format!(
                "the Patient has no identifier in a system '{}' owns ({})",
                org.id,
                org.identifier_systems.join(", ")
            ))
            .at("Patient.identifier")
        })
}

/// A record validated and normalised, ready to match. Held boxed: a group's records pass
/// through several vectors between matching and writing, and at ~700 bytes each a 50,000-record
/// group moved tens of megabytes into fresh memory at every step.
struct Prepared {
    system: String,
    value: String,
    patient: Value,
    /// As filed in `source_identifiers` (`indexed_identifiers`: shared ids normalised, the
    /// record's own identifier left to its row).
    ids: Vec<(String, String)>,
    /// As sent, for the online path.
    raw_ids: Vec<(String, String)>,
    demo: Demographics,
    sketch: Sketch,
    keys: Vec<KeyId>,
    /// The row's content (serialised here, on every core).
    content: SourceContent,
    /// The golden record of a person known only from this record.
    golden: String,
    merge: bool,
}

/// A Patient to feed, under the identifier named by the request (ITI-104's
/// `Patient?identifier=`) or, when none is named, its first identifier in a system the
/// member owns.
pub struct Submission {
    pub patient: Value,
    pub under: Option<(String, String)>,
}

impl From<Value> for Submission {
    fn from(patient: Value) -> Submission {
        Submission {
            patient,
            under: None,
        }
    }
}

fn prepare(s: &MpiSettings, org: &Organization, sub: Submission) -> Result<Box<Prepared>> {
    let Submission { patient, under } = sub;
    let (system, value) = match under {
        Some(id) => id,
        None => own_identifier(org, &patient)?,
    };
    let raw_ids = validate_feed(
        s,
        org,
        &FeedRequest {
            system: &system,
            value: &value,
            patient: &patient,
        },
    )?;
    let merge = replaced_by(&patient)?.is_some();
    let demo = Demographics::from_patient(&patient, &s.shared_systems);
    Ok(Box::new(Prepared {
        keys: demo.key_ids(),
        content: content(&patient, &demo, 0),
        golden: golden(&[&patient]),
        ids: indexed_identifiers(s, &raw_ids, (&system, &value)),
        raw_ids,
        sketch: Sketch::of(&demo),
        demo,
        system,
        value,
        patient,
        merge,
    }))
}

/// Frees, here on the matcher's thread, the parsed Patient of each decided record that starts
/// a person alone: the writer needs a record's Patient only to build the golden record of a
/// person it joins or shares with the group's other new records, and a lone record's golden
/// record is built already (`Prepared::golden`). Freed by the writer, the first member's
/// Patients were 7 % of its time in a 1M load (BENCHMARKS.md, session 29), where the writer is
/// the thread every other waits on. A group matched again when written gets them back from
/// the rows' text (`restore_patient`).
fn let_go_of_lone_patients(decided: &mut [Decided], first_identity: i64) {
    let mut people: fnv::FnvHashMap<i64, u32> = fnv::FnvHashMap::default();
    for d in decided.iter() {
        *people.entry(d.eid).or_default() += 1;
    }
    for d in decided.iter_mut() {
        if d.eid >= first_identity && d.eid != UNDECIDED && people.get(&d.eid) == Some(&1) {
            drop(std::mem::take(&mut d.prepared.patient));
        }
    }
}

/// The Patient `let_go_of_lone_patients` freed (a fed Patient is never null: a freed one is),
/// parsed again from the row's resource text (`content`: the Patient as serialised).
fn restore_patient(p: &mut Prepared) -> Result<()> {
    if p.patient.is_null() {
        p.patient = serde_json::from_str(&p.content.resource)
            .map_err(|e| Error::internal(format!("a record's own resource text: {e}")))?;
    }
    Ok(())
}

/// An accepted record with its position in the group.
type Accepted = (usize, Box<Prepared>);

/// Validation and normalisation on every core, in order.
fn prepare_all(
    s: &MpiSettings,
    org: &Organization,
    patients: Vec<Submission>,
) -> Vec<Result<Box<Prepared>>> {
    // A feed batch's few records are prepared here (the core count is read from the cgroup's
    // files: ~4 % of the HTTP feed's CPU when it was asked every batch).
    if patients.len() < 256 {
        return patients.into_iter().map(|p| prepare(s, org, p)).collect();
    }
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(8);
    if threads < 2 {
        return patients.into_iter().map(|p| prepare(s, org, p)).collect();
    }
    let per = patients.len().div_ceil(threads);
    let mut parts: Vec<Vec<Submission>> = Vec::new();
    let mut rest = patients;
    while !rest.is_empty() {
        let tail = rest.split_off(per.min(rest.len()));
        parts.push(rest);
        rest = tail;
    }
    std::thread::scope(|scope| {
        let handles: Vec<_> = parts
            .into_iter()
            .map(|part| {
                scope.spawn(move || {
                    part.into_iter()
                        .map(|p| prepare(s, org, p))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| {
                h.join()
                    .unwrap_or_else(|_| vec![Err(Error::internal("record preparation failed"))])
            })
            .collect()
    })
}

/// Per position, the refusal or a slot to fill; and the accepted records with their positions.
fn split_refused(
    prepared: Vec<Result<Box<Prepared>>>,
) -> (Vec<Option<Result<FeedResult>>>, Vec<Accepted>) {
    let mut results = Vec::with_capacity(prepared.len());
    let mut accepted = Vec::with_capacity(prepared.len());
    for (pos, p) in prepared.into_iter().enumerate() {
        match p {
            Ok(p) => {
                results.push(None);
                accepted.push((pos, p));
            }
            Err(e) => results.push(Some(Err(e))),
        }
    }
    (results, accepted)
}

/// Ids at or above this stand for records and identities decided but not yet written. They
/// rank above every stored id and in the order they were decided, as their real ids will.
const PENDING: i64 = 1 << 62;

/// A group no writer writes: what `unmatched` groups depend on, so they are matched when
/// written.
const NEVER_WRITTEN: u64 = u64::MAX;

/// The person of a pending record whose match is decided only as it is written. Never
/// resolved: a record decided on it is matched again (`Written::changed_under`).
const UNDECIDED: i64 = i64::MAX;

/// A new record decided, before ids are allocated: its own id is pending, its identity
/// (`eid`) real or pending, and so may be the candidates of its evaluation.
struct Decided {
    pos: usize,
    prepared: Box<Prepared>,
    eid: i64,
    eval: Evaluation,
}

/// A group's decided records, candidates for the records matched after them until the group
/// is known to be written (then the database holds them).
struct PendingGroup {
    group: u64,
    /// The pending id of `records[0]`; the others follow.
    first: i64,
    records: Vec<Candidate>,
    keys: fnv::FnvHashMap<KeyId, Vec<usize>>,
    identifiers: HashSet<(String, String)>,
}

/// One member's records, matched and ready to write (`write_group`).
pub struct Matched {
    group: u64,
    org: Organization,
    results: Vec<Option<Result<FeedResult>>>,
    decided: Vec<Decided>,
    /// Records for the online path, decided when written: updates, merges, a second record
    /// under one identifier, a match that would merge identities.
    online: Vec<Accepted>,
    /// The groups after this one are matched without waiting for its online records (all of
    /// them matches that would merge identities): the writer notes what those touch, and a
    /// later group decided on any of it is matched again (`Written::changed_under`).
    online_unseen: bool,
    first_record: i64,
    first_identity: i64,
    new_identities: usize,
    /// The groups still unwritten when this one was matched: its decisions hold only if each
    /// was written as decided.
    depends_on: Vec<u64>,
    /// The database as matched: the count of other writes before it, and its newest record.
    generation: u64,
    newest_record: i64,
    /// SQLite's `data_version` of the writer's connection when it read for the group.
    data_version: Option<i64>,
    /// Each new record's result carries its row as written (`FeedResult::stored`): the HTTP
    /// feed answers with it instead of reading it back.
    rows: bool,
    /// The matcher waits for this group to be written (`Matcher::needs_flush`).
    holds_up: bool,
}

impl Matched {
    pub fn group(&self) -> u64 {
        self.group
    }

    /// Whether the matcher waits for this group to be written before it matches the next
    /// (its online records change what the next must see): its writer must commit it then.
    pub fn holds_up_next(&self) -> bool {
        self.holds_up
    }

    /// Asks for each new record's row in its result (`FeedResult::stored`).
    pub fn with_rows(mut self) -> Matched {
        self.rows = true;
        self
    }
}

/// Decides groups of records in order. Alone (`feed_many`) it matches inside the write
/// transaction; in a `Pipeline` it matches the next group on a reading connection while the
/// last is written, taking the decided-but-unwritten groups as candidates as if stored.
pub struct Matcher {
    pending: VecDeque<Arc<PendingGroup>>,
    next_record: i64,
    next_identity: i64,
    next_group: u64,
    /// A group whose online records change what the next one must see: wait until written.
    flush_after: Option<u64>,
    /// An initial load's records already written, still matched from memory (`resident`).
    resident: Option<Resident>,
    /// The group being matched is written in a transaction of its own (`Matched::holds_up`):
    /// matched from memory while the load's indexes are deferred, so that when the matcher
    /// must read the database it can wait for every group before to be committed and then
    /// build them (`ReadRequest::restore`) — the writer holds no transaction open meanwhile.
    commit_alone: bool,
}

impl Default for Matcher {
    fn default() -> Self {
        Matcher {
            pending: VecDeque::new(),
            next_record: PENDING,
            next_identity: PENDING,
            next_group: 0,
            flush_after: None,
            resident: None,
            commit_alone: false,
        }
    }
}

/// The written groups of a load into an empty index, kept as one pending group (`Matcher::
/// resident`): every record stored is one of them, so matching reads nothing. Its records keep
/// their pending ids, which the writer resolves (`Written::for_resident`).
struct Resident {
    /// The groups' records, keys and identifiers, in order (`first`: the first group's).
    merged: Arc<PendingGroup>,
    /// The groups merged: a group decided on their records holds only if each was written as
    /// decided (`Matched::depends_on`).
    groups: Vec<u64>,
    /// The newest record id when the load began, before its first group.
    base: i64,
}

/// Records an initial load keeps in memory at most (`Matcher::resident`): ~1.4 KB each with
/// their keys and identifiers (the 1M benchmark's first member, 833k records, peaked at
/// 3.2 GB against 2.0 GB; BENCHMARKS.md, session 33). Past them it reads the database again.
pub const RESIDENT_RECORDS: usize = 1_000_000;

/// Groups kept in memory at most (each costs the writer's id lookups a step).
pub const RESIDENT_GROUPS: usize = 64;

impl Matcher {
    /// For a load into an index that holds no record (`base`: the newest record id, as
    /// `store::newest_id` gives it): the load's records are then the only candidates there
    /// are, and every one it has decided is in memory, so matching reads nothing from the
    /// database — a load's reads had cost the server as much CPU as its writes. The groups
    /// written stay in memory, not read back, as long as each was written as decided and
    /// nothing else added a record (each write checks that its ids follow the load's newest:
    /// `write_group`), none had records of the online path (an update or a merge changes
    /// records in the database), and they stay under `RESIDENT_RECORDS` and
    /// `RESIDENT_GROUPS`; then the database is read again, as by `Matcher::default`. Its
    /// writer resolves pending ids from `Written::for_resident`.
    pub fn resident(base: i64) -> Matcher {
        Matcher {
            resident: Some(Resident {
                merged: Arc::new(PendingGroup {
                    group: NEVER_WRITTEN,
                    first: PENDING,
                    records: Vec::new(),
                    keys: fnv::FnvHashMap::default(),
                    identifiers: HashSet::new(),
                }),
                groups: Vec::new(),
                base,
            }),
            ..Matcher::default()
        }
    }

    /// The written groups (below `done`) leave the pending ones: merged into the resident
    /// ones, or forgotten (the database holds them).
    fn settle_written(&mut self, done: u64, redecided: bool) {
        if redecided {
            self.leave_memory("a batch was matched again as it was written");
        }
        while self.pending.front().is_some_and(|g| g.group < done) {
            let Some(g) = self.pending.pop_front() else {
                break;
            };
            if let Some(r) = self.resident.as_mut() {
                let kept = r.merged.records.len() + g.records.len() <= RESIDENT_RECORDS
                    && r.groups.len() < RESIDENT_GROUPS
                    && g.first == r.merged.first + r.merged.records.len() as i64;
                match (kept, Arc::get_mut(&mut r.merged), Arc::try_unwrap(g)) {
                    (true, Some(m), Ok(g)) => {
                        let at = m.records.len();
                        for (key, ix) in g.keys {
                            m.keys
                                .entry(key)
                                .or_default()
                                .extend(ix.iter().map(|i| at + i));
                        }
                        m.records.extend(g.records);
                        m.identifiers.extend(g.identifiers);
                        r.groups.push(g.group);
                    }
                    _ => self.leave_memory("it keeps no more records in memory"),
                }
            }
        }
    }

    /// The groups whose records are candidates besides the stored ones: those kept in memory
    /// (the oldest), then the pending ones.
    fn candidate_groups(&self) -> Vec<Arc<PendingGroup>> {
        let resident = self.resident.as_ref().map(|r| Arc::clone(&r.merged));
        resident
            .into_iter()
            .chain(self.pending.iter().cloned())
            .collect()
    }

    /// A resident load goes on from the database (`why`).
    fn leave_memory(&mut self, why: &str) {
        if let Some(r) = self.resident.take() {
            tracing::debug!(
                records = r.merged.records.len(),
                "the load now reads its candidates from the database: {why}"
            );
        }
    }

    /// Matches one member's records: `begin`, `ReadRequest::run` on `conn`, `finish`.
    pub fn match_group(
        &mut self,
        conn: &mut DbConn,
        s: &MpiSettings,
        org: &Organization,
        subs: Vec<Submission>,
        pipe: Option<&Pipeline>,
    ) -> Result<Matched> {
        let read = self.begin(s, org, subs, pipe)?;
        let reading = read.run(conn, s, pipe)?;
        Ok(self.finish(s, org, reading, pipe.is_some()))
    }

    /// Validates and normalises the records (every core, no database), and says what to read
    /// for them. With `pipe`: first waits for a group whose online records the next must see,
    /// forgets the groups now written, and notes the count of other writes — before the
    /// snapshot, so a write finishing meanwhile makes the group look stale (decided again
    /// when written), never fresh.
    pub fn begin(
        &mut self,
        s: &MpiSettings,
        org: &Organization,
        subs: Vec<Submission>,
        pipe: Option<&Pipeline>,
    ) -> Result<ReadRequest> {
        let prepared = prepare_all(s, org, subs);
        let mut generation = 0;
        let mut restore = None;
        if let Some(pipe) = pipe {
            if let Some(g) = self.flush_after.take() {
                pipe.wait_finished(g)?;
            }
            let (done, writes) = pipe.begin();
            generation = writes;
            self.settle_written(done, pipe.redecided());
            let deferred = pipe.indexes_deferred();
            self.commit_alone = deferred && self.resident.is_some();
            if deferred && self.resident.is_none() {
                restore = Some(self.next_group);
            }
        } else {
            self.leave_memory("matched without a pipeline");
        }
        Ok(ReadRequest {
            prepared,
            pending: self.candidate_groups(),
            generation,
            on_writer: false,
            statement_snapshots: false,
            resident: self.resident.as_ref().map(|r| r.base),
            restore,
        })
    }

    /// Decides the records in order with what was read; with `pipelined`, keeps them as
    /// candidates for the groups matched next, until written.
    pub fn finish(
        &mut self,
        s: &MpiSettings,
        org: &Organization,
        reading: Reading,
        pipelined: bool,
    ) -> Matched {
        let Reading {
            results,
            mut online,
            gathered,
            newest_record,
            generation,
            data_version,
        } = reading;
        let group = self.next_group;
        self.next_group += 1;
        let first_record = self.next_record;
        let first_identity = self.next_identity;
        let pending = self.candidate_groups();
        let (mut decided, deferred, mut mine) =
            decide(s, org, gathered, &pending, first_record, first_identity);
        drop(pending);
        // Updates, merges by link and repeated identifiers change stored records the next
        // group may be matched with: it waits for them. Records whose match would merge
        // identities are written after the group's decided ones, as new records: the next
        // group goes on with them as candidates whose person is not known yet
        // (`UNDECIDED`), and is matched again when written if it was decided on one of them
        // or on a person they touched (`Written::changed_under`).
        let wait = !online.is_empty();
        let online_unseen = pipelined && !wait && !deferred.is_empty();
        // The database is read again after records of the online path: they may change
        // records kept in memory.
        let depends_on: Vec<u64> = match self.resident.as_ref() {
            Some(r) => r.groups.clone(),
            None => Vec::new(),
        };
        if wait || !deferred.is_empty() {
            self.leave_memory("records of the online path change stored ones");
        }
        if online_unseen {
            mine.extend(deferred.iter().enumerate().map(|(i, (_, p))| {
                let id = first_record + (decided.len() + i) as i64;
                Candidate::new(id, org.id.to_string(), UNDECIDED, p.demo.clone())
            }));
        }
        online.extend(deferred);
        online.sort_by_key(|(pos, _)| *pos);
        // A record linked to an undecided one is matched again when written (not new).
        let new_identities = decided
            .iter()
            .filter(|d| d.eid >= first_identity && d.eid != UNDECIDED)
            .count();
        let_go_of_lone_patients(&mut decided, first_identity);
        self.next_record += mine.len() as i64;
        self.next_identity += new_identities as i64;
        let depends_on = depends_on
            .into_iter()
            .chain(self.pending.iter().map(|g| g.group))
            .collect();
        if pipelined {
            // Online records too: the same identifier later is an update of what they write.
            let identifiers = decided
                .iter()
                .map(|d| &d.prepared)
                .chain(online.iter().map(|(_, p)| p))
                .map(|p| (p.system.clone(), p.value.clone()))
                .collect();
            let mut keys: fnv::FnvHashMap<KeyId, Vec<usize>> = fnv::FnvHashMap::default();
            let unseen = online.iter().filter(|_| online_unseen).map(|(_, p)| p);
            for (k, p) in decided
                .iter()
                .map(|d| &d.prepared)
                .chain(unseen)
                .enumerate()
            {
                for key in &p.keys {
                    keys.entry(*key).or_default().push(k);
                }
            }
            self.pending.push_back(Arc::new(PendingGroup {
                group,
                first: first_record,
                records: mine,
                keys,
                identifiers,
            }));
            if wait {
                self.flush_after = Some(group);
            }
        }
        Matched {
            group,
            org: org.clone(),
            results,
            decided,
            online,
            online_unseen,
            first_record,
            first_identity,
            new_identities,
            depends_on,
            generation,
            newest_record,
            data_version,
            rows: false,
            holds_up: pipelined && (wait || self.commit_alone),
        }
    }

    /// One member's records left to be matched as they are written: a group of the same
    /// batch before them changes more than it adds (see `needs_flush`), and the batch is
    /// written as one.
    pub fn unmatched(
        &mut self,
        s: &MpiSettings,
        org: &Organization,
        subs: Vec<Submission>,
    ) -> Matched {
        let group = self.next_group;
        self.next_group += 1;
        self.flush_after = Some(group);
        let (results, online) = split_refused(prepare_all(s, org, subs));
        Matched {
            group,
            org: org.clone(),
            results,
            decided: Vec::new(),
            online,
            online_unseen: false,
            first_record: self.next_record,
            first_identity: self.next_identity,
            new_identities: 0,
            depends_on: vec![NEVER_WRITTEN],
            generation: 0,
            newest_record: 0,
            data_version: None,
            rows: false,
            holds_up: true,
        }
    }

    /// Whether the group matched last must be written before the next one is matched.
    pub fn needs_flush(&self) -> bool {
        self.flush_after.is_some()
    }

    /// Forgets the groups from `group` on: they were never handed to the writer.
    pub fn discard_from(&mut self, group: u64) {
        self.pending.retain(|g| g.group < group);
        if self.flush_after.is_some_and(|g| g >= group) {
            self.flush_after = None;
        }
    }
}

/// What matching a group reads from the database (`Matcher::begin`). It can run on any
/// connection — on SQLite best the writer's, whose page cache is warm — while the matcher
/// waits.
pub struct ReadRequest {
    prepared: Vec<Result<Box<Prepared>>>,
    pending: Vec<Arc<PendingGroup>>,
    generation: u64,
    on_writer: bool,
    /// PostgreSQL: each statement reads in a snapshot of its own (`statement_snapshots`).
    statement_snapshots: bool,
    /// A resident load's (`Matcher::resident`): the newest record id before it began, and
    /// nothing to read.
    resident: Option<i64>,
    /// The load's deferred indexes are built before the read (`Pipeline::defer_indexes`),
    /// once the groups before this one are committed.
    restore: Option<u64>,
}

/// What was read for a group (`ReadRequest::run`), for `Matcher::finish`.
pub struct Reading {
    results: Vec<Option<Result<FeedResult>>>,
    online: Vec<Accepted>,
    gathered: Gathered,
    newest_record: i64,
    generation: u64,
    data_version: Option<i64>,
}

impl ReadRequest {
    /// The reads will run on the connection that writes the group (the SQLite writer's): the
    /// write then also checks that no other connection — another process — committed since
    /// (SQLite's `data_version`), which catches its link changes and updates too.
    pub fn on_writer(mut self) -> ReadRequest {
        self.on_writer = true;
        self
    }

    /// PostgreSQL: the reads run as statements of their own, each in its own snapshot, rather
    /// than in one transaction — two round trips fewer (its `BEGIN` and `COMMIT`) of a feed
    /// group's four. For a connection that plans generically by itself (the feed's matcher's,
    /// `Db::read_kept`), since no transaction sets that up. Nothing the matching relies on
    /// needs the one snapshot: the newest record id is read first, so a record another
    /// process adds between two statements has a larger id and the group is matched again
    /// as written (its ids do not continue from that newest one); a write of this process
    /// meanwhile moves `Db::writes` and does the same; the candidates' rows are read by the
    /// ids the key lookup found, so a batch of the feed committed in between adds none (its
    /// records are pending here, and their published ids are dropped from what is stored,
    /// whichever statement saw them); and an update or merge in between by another process
    /// goes unnoticed either way (ARCHITECTURE.md: the gap is the same as before).
    pub fn statement_snapshots(mut self) -> ReadRequest {
        self.statement_snapshots = true;
        self
    }

    /// Reads in one transaction of its own (a savepoint inside the caller's, if any;
    /// PostgreSQL: REPEATABLE READ, READ ONLY when it is the outermost), held no longer than
    /// the reads: a long reader keeps SQLite's write-ahead log from starting over. On
    /// PostgreSQL with `statement_snapshots`, in no transaction.
    pub fn run(
        self,
        conn: &mut DbConn,
        s: &MpiSettings,
        pipe: Option<&Pipeline>,
    ) -> Result<Reading> {
        let ReadRequest {
            prepared,
            pending,
            generation,
            on_writer,
            statement_snapshots,
            resident,
            restore,
        } = self;
        if let (Some(group), Some(pipe)) = (restore, pipe) {
            if let Some(before) = group.checked_sub(1) {
                pipe.wait_finished(before)?;
            }
            let started = std::time::Instant::now();
            let built = store::restore_load_indexes(conn, None)?;
            pipe.deferred.store(false, Ordering::SeqCst);
            tracing::info!(
                built,
                secs = started.elapsed().as_secs_f64(),
                "the load reads the database: the indexes it deferred are built"
            );
        }
        let (results, candidates) = split_refused(prepared);
        if let Some(base) = resident {
            // Every record stored is pending here: no snapshot, no read.
            let data_version = match on_writer && conn.is_sqlite() {
                true => Some(store::data_version(conn)?),
                false => None,
            };
            let (fresh, online) = split_new(None, &pending, candidates, None)?;
            let gathered = gather(conn, s, fresh, &pending, &HashSet::new(), Some(Vec::new()))?;
            return Ok(Reading {
                results,
                online,
                gathered,
                newest_record: base,
                generation,
                data_version,
            });
        }
        let read = |c: &mut DbConn| {
            let data_version = match on_writer && c.is_sqlite() {
                true => Some(store::data_version(c)?),
                false => None,
            };
            // A feed batch of one identifier system: its first reads in one round trip.
            let first = match candidates.first() {
                Some((_, p0)) if candidates.iter().all(|(_, p)| p.system == p0.system) => {
                    let values: Vec<&str> =
                        candidates.iter().map(|(_, p)| p.value.as_str()).collect();
                    let mut keys: Vec<KeyId> = candidates
                        .iter()
                        .flat_map(|(_, p)| p.keys.iter().copied())
                        .collect();
                    keys.sort_unstable();
                    keys.dedup();
                    store::first_reads(c, &p0.system, &values, &keys)?
                }
                _ => None,
            };
            let newest_record = match &first {
                Some(f) => f.newest,
                None => store::newest_id(c, IdTable::SourceRecords)?,
            };
            // Records of groups both pending here and already in the snapshot: the pending
            // copy stands (their real ids were published before the commit).
            let shadow = match pipe {
                Some(p) => p.published(pending.iter().map(|g| g.group)),
                None => HashSet::new(),
            };
            let (existing, hits) = match first {
                Some(f) => (Some(f.existing), Some(f.hits)),
                None => (None, None),
            };
            let (fresh, online) = split_new(Some(c), &pending, candidates, existing)?;
            let gathered = gather(c, s, fresh, &pending, &shadow, hits)?;
            Ok(Reading {
                results,
                online,
                gathered,
                newest_record,
                generation,
                data_version,
            })
        };
        match statement_snapshots && !conn.is_sqlite() {
            true => read(conn),
            false => db::snapshot(conn, read),
        }
    }
}

/// What matching and writing on two connections share: which groups are finished, and the
/// real ids of records being written, published before their commit.
pub struct Pipeline {
    state: Mutex<PipeState>,
    finished: Condvar,
    writes: Arc<AtomicU64>,
    /// The load's indexes are deferred (`defer_indexes`).
    deferred: AtomicBool,
    /// A group was matched again as written: what the matcher keeps in memory of the groups
    /// written (`Matcher::resident`) no longer holds.
    redecided: AtomicBool,
}

#[derive(Default)]
struct PipeState {
    /// Groups below this are finished: committed or rolled back.
    done: u64,
    published: HashMap<u64, Vec<i64>>,
}

/// How long matching waits for a group to be written before giving up.
const FLUSH_WAIT: Duration = Duration::from_secs(120);

impl Pipeline {
    /// `writes` counts the database's other writes (`Db::writes`): a group matched before
    /// one of them is decided again when written.
    pub fn new(writes: Arc<AtomicU64>) -> Pipeline {
        Pipeline {
            state: Mutex::new(PipeState::default()),
            finished: Condvar::new(),
            writes,
            deferred: AtomicBool::new(false),
            redecided: AtomicBool::new(false),
        }
    }

    /// An initial load dropped what only readers need (`db::mpi::defer_load_indexes`): its
    /// groups matched from memory are committed one by one, and the matcher builds them back
    /// before it first reads the database (after the groups before are committed).
    pub fn defer_indexes(&self) {
        self.deferred.store(true, Ordering::SeqCst);
    }

    /// Whether the load's indexes are still deferred (`defer_indexes`).
    pub fn indexes_deferred(&self) -> bool {
        self.deferred.load(Ordering::SeqCst)
    }

    fn redecided(&self) -> bool {
        self.redecided.load(Ordering::SeqCst)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PipeState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Groups up to `group` are written or rolled back: a snapshot taken from now on shows it.
    pub fn finished(&self, group: u64) {
        let mut st = self.lock();
        st.done = st.done.max(group + 1);
        drop(st);
        self.finished.notify_all();
    }

    fn wait_finished(&self, group: u64) -> Result<()> {
        let st = self.lock();
        let (st, timeout) = self
            .finished
            .wait_timeout_while(st, FLUSH_WAIT, |st| st.done <= group)
            .unwrap_or_else(|e| e.into_inner());
        drop(st);
        if timeout.timed_out() {
            return Err(Error::unavailable(
                "the identity feed's writer is not keeping up; retry shortly",
            ));
        }
        Ok(())
    }

    /// The groups finished and the count of other writes, before a read. The matcher forgets
    /// the finished groups now, so their published ids go too — not when they finish: a read
    /// that still takes a group as pending needs them to drop its stored copy.
    fn begin(&self) -> (u64, u64) {
        let mut st = self.lock();
        let done = st.done;
        st.published.retain(|g, _| *g >= done);
        drop(st);
        (done, self.writes.load(Ordering::SeqCst))
    }

    fn publish(&self, group: u64, ids: &[i64]) {
        let mut st = self.lock();
        st.published.entry(group).or_default().extend(ids);
    }

    fn published(&self, groups: impl Iterator<Item = u64>) -> HashSet<i64> {
        let st = self.lock();
        groups
            .filter_map(|g| st.published.get(&g))
            .flatten()
            .copied()
            .collect()
    }

    fn generation(&self) -> u64 {
        self.writes.load(Ordering::SeqCst)
    }
}

/// What the writer remembers of the groups it wrote last: the real ids behind their pending
/// ones, for the groups matched while they were written.
#[derive(Default, Clone)]
pub struct Written {
    groups: VecDeque<WrittenGroup>,
    /// Keeps the groups a resident matcher may have decided on (`for_resident`).
    resident: bool,
    matched_again: u64,
    /// The commit of the groups written last, while it may still be under way.
    commit: Option<Arc<Commit>>,
}

/// Whether a write's transaction committed, once known: told by whoever commits it, awaited
/// by the write after it. The PostgreSQL feed commits a batch while it writes the next
/// (`Db::write_open`): the next one's inserts need nothing of the batch before, but whatever
/// reads what that batch wrote — the stored people its records join (their golden records,
/// and their rows, which a new record's row must reference), records of the online path, a
/// group matched again — waits for its commit first (`Written::committed`), and a write
/// after a batch that did not commit fails, to be rolled back.
#[derive(Default)]
pub struct Commit {
    known: Mutex<Option<bool>>,
    told: Condvar,
}

impl Commit {
    pub fn tell(&self, committed: bool) {
        *self.known.lock().unwrap_or_else(|e| e.into_inner()) = Some(committed);
        self.told.notify_all();
    }

    fn wait(&self) -> Result<()> {
        let known = self.known.lock().unwrap_or_else(|e| e.into_inner());
        let (known, _) = self
            .told
            .wait_timeout_while(known, FLUSH_WAIT, |k| k.is_none())
            .unwrap_or_else(|e| e.into_inner());
        match *known {
            Some(true) => Ok(()),
            Some(false) => Err(Error::unavailable(
                "the identity feed's batch before this one did not commit; retrying",
            )),
            None => Err(Error::unavailable(
                "the identity feed's writer is not keeping up; retry shortly",
            )),
        }
    }
}

#[derive(Clone)]
struct WrittenGroup {
    group: u64,
    as_decided: bool,
    first_record: i64,
    records: Vec<i64>,
    first_identity: i64,
    identities: Vec<i64>,
    /// The newest source record it wrote.
    newest: i64,
    /// What its online records touched, when later groups were matched without them.
    touched: Option<Touched>,
}

/// What a group's online records, matched after later groups were, change for those groups:
/// the records themselves (pending ids, as those groups saw them), the people their matching
/// merged away (identities of their candidates that changed), and the keys of any that
/// failed (the later groups took them as filed).
#[derive(Clone, Default)]
struct Touched {
    records: HashSet<i64>,
    identities: HashSet<i64>,
    keys: HashSet<KeyId>,
}

/// Groups remembered; a group depends on at most the few matched ahead of its write.
const WRITTEN_KEPT: usize = 32;

impl Written {
    /// For the writer of a resident matcher's groups (`Matcher::resident`): their records
    /// may be decided on any group it kept in memory, so it remembers that many more.
    pub fn for_resident() -> Written {
        Written {
            resident: true,
            ..Written::default()
        }
    }

    /// Groups whose decisions had gone stale by the time they were written, so were matched
    /// again in the write transaction.
    pub fn matched_again(&self) -> u64 {
        self.matched_again
    }

    /// The groups written last are committing: what reads their rows waits for it.
    pub fn committing(&mut self, commit: Arc<Commit>) {
        self.commit = Some(commit);
    }

    /// Waits until the groups written last have committed, if that may still be under way;
    /// fails if they did not.
    fn committed(&self) -> Result<()> {
        self.commit.as_ref().map_or(Ok(()), |c| c.wait())
    }

    fn push(&mut self, g: WrittenGroup) {
        self.groups.push_back(g);
        let kept = match self.resident {
            true => RESIDENT_GROUPS + WRITTEN_KEPT,
            false => WRITTEN_KEPT,
        };
        while self.groups.len() > kept {
            self.groups.pop_front();
        }
    }

    /// The newest record of `groups` if each was written as decided.
    fn newest_of(&self, groups: &[u64]) -> Option<i64> {
        groups.iter().try_fold(0i64, |newest, g| {
            let w = self.groups.iter().find(|w| w.group == *g && w.as_decided)?;
            Some(newest.max(w.newest))
        })
    }

    /// Whether a record of `m` was decided on something the unseen online records of a group
    /// it depends on changed: it scored one of them, or a record of a person they may have
    /// linked or merged, or it shares a key with one that was not written.
    fn changed_under(&self, m: &Matched) -> bool {
        let touched: Vec<&Touched> = self
            .groups
            .iter()
            .filter(|w| m.depends_on.contains(&w.group))
            .filter_map(|w| w.touched.as_ref())
            .collect();
        if touched.is_empty() {
            return false;
        }
        let person = |eid: i64| match eid >= PENDING {
            true => self.resolve(eid, true),
            false => Some(eid),
        };
        m.decided.iter().any(|d| {
            touched.iter().any(|t| {
                d.prepared.keys.iter().any(|k| t.keys.contains(k))
                    || d.eval.ranked.iter().any(|c| {
                        t.records.contains(&c.source_id)
                            || person(c.enterprise_id).is_some_and(|e| t.identities.contains(&e))
                    })
            })
        })
    }

    fn resolve(&self, id: i64, identity: bool) -> Option<i64> {
        self.groups.iter().filter(|w| w.as_decided).find_map(|w| {
            let (first, ids) = if identity {
                (w.first_identity, &w.identities)
            } else {
                (w.first_record, &w.records)
            };
            id.checked_sub(first)
                .and_then(|k| usize::try_from(k).ok())
                .and_then(|k| ids.get(k).copied())
        })
    }
}

/// Feeds `patients` of `org`. Returns one result per patient, in order: a refused record is
/// an error of its own and changes nothing. `audit` writes the audit trail of the batch in
/// its transaction. An error of the database fails the whole batch (nothing written).
pub fn feed_many<A>(
    conn: &mut DbConn,
    s: &MpiSettings,
    org: &Organization,
    patients: Vec<Submission>,
    audit: A,
) -> Result<Vec<Result<FeedResult>>>
where
    A: FnOnce(&mut DbConn, &[Result<FeedResult>]) -> Result<()>,
{
    let prepared = prepare_all(s, org, patients);
    db::write_tx(conn, |conn| {
        let m = match_now(conn, s, org, prepared)?;
        write_group(conn, s, &mut Written::default(), m, None, audit)
    })
}

/// Matches prepared records on the database as it is, inside the caller's transaction.
fn match_now(
    conn: &mut DbConn,
    s: &MpiSettings,
    org: &Organization,
    prepared: Vec<Result<Box<Prepared>>>,
) -> Result<Matched> {
    let read = ReadRequest {
        prepared,
        pending: Vec::new(),
        generation: 0,
        on_writer: false,
        statement_snapshots: false,
        resident: None,
        restore: None,
    };
    let reading = read.run(conn, s, None)?;
    Ok(Matcher::default().finish(s, org, reading, false))
}

/// Writes a matched group inside the caller's write transaction: as decided when nothing it
/// was decided on changed since (the groups before it written as decided, no other write,
/// no record added by anyone else), else decided again on the database as it is now.
pub fn write_group<A>(
    conn: &mut DbConn,
    s: &MpiSettings,
    written: &mut Written,
    m: Matched,
    pipe: Option<&Pipeline>,
    audit: A,
) -> Result<Vec<Result<FeedResult>>>
where
    A: FnOnce(&mut DbConn, &[Result<FeedResult>]) -> Result<()>,
{
    let now = crate::time::now_micros();
    // The records' ids and their new people's, in one round trip on PostgreSQL.
    let (records, people) = (m.decided.len(), m.new_identities);
    let ids = match pipe {
        // Matched in this transaction: nothing can have changed.
        None => Some(store::allocate_record_and_identity_ids(
            conn, records, people,
        )?),
        Some(p) => match written.newest_of(&m.depends_on) {
            Some(newest)
                if p.generation() == m.generation
                    && m.data_version
                        .map_or(Ok(true), |v| store::data_version(conn).map(|now| now == v))?
                    && !written.changed_under(&m) =>
            {
                // The ids continue from the newest record the group was matched with: no
                // record was added by anyone else since.
                let newest = newest.max(m.newest_record);
                let (sids, eids) = store::allocate_record_and_identity_ids(conn, records, people)?;
                sids.first()
                    .is_none_or(|first| *first == newest + 1)
                    .then_some((sids, eids))
            }
            _ => None,
        },
    };
    let Some((sids, eids)) = ids else {
        if let Some(p) = pipe {
            p.redecided.store(true, Ordering::SeqCst);
        }
        written.committed()?;
        return redecide(conn, s, written, m, audit);
    };
    if !m.online.is_empty() {
        written.committed()?;
    }
    if let Some(p) = pipe {
        p.publish(m.group, &sids);
    }
    let Matched {
        group,
        org,
        mut results,
        decided,
        online,
        online_unseen,
        first_record,
        first_identity,
        rows,
        ..
    } = m;
    let ids = Ids {
        first_record,
        sids: &sids,
        first_identity,
        eids: &eids,
        written,
    };
    // A record on the online path can merge away the person of a new record before it.
    let rows = rows && online.is_empty();
    write_decided(conn, &org, &ids, decided, now, rows, &mut results)?;
    let mut touched = online_unseen.then(Touched::default);
    let unseen_first = first_record + ids.sids.len() as i64;
    for (k, (pos, p)) in online.into_iter().enumerate() {
        // The records its matching reads and their people, read just before it as `feed_in`
        // reads them: the people it merges away are those that change.
        let before = match touched.as_mut() {
            Some(t) => {
                t.records.insert(unseen_first + k as i64);
                let candidates =
                    store::candidates(conn, &p.keys, None, s.max_candidates, store::CROWDED)?;
                candidates.into_iter().map(|c| (c.0, c.2)).collect()
            }
            None => Vec::new(),
        };
        let req = FeedRequest {
            system: &p.system,
            value: &p.value,
            patient: &p.patient,
        };
        // A savepoint each: a refused update leaves the rest of the batch alone.
        let r =
            diesel::Connection::transaction(&mut *conn, |c| feed_in(c, s, &org, &req, &p.raw_ids));
        match (touched.as_mut(), &r) {
            (Some(t), Ok(r)) => {
                let ids: Vec<i64> = before.iter().map(|c| c.0).collect();
                let after: HashMap<i64, i64> = store::matchable(conn, &ids)?
                    .into_iter()
                    .map(|c| (c.0, c.2))
                    .collect();
                t.identities.extend(
                    before
                        .iter()
                        .filter(|(id, eid)| after.get(id) != Some(eid))
                        .map(|c| c.1),
                );
                // Pending in later groups' reads too: a snapshot holding it drops its copy.
                if let Some(p) = pipe {
                    p.publish(group, &[r.source_id]);
                }
            }
            (Some(t), Err(_)) => t.keys.extend(p.keys.iter().copied()),
            (None, _) => {}
        }
        results[pos] = Some(r);
    }
    let results: Vec<Result<FeedResult>> = results
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err(Error::internal("record left undecided"))))
        .collect();
    audit(conn, &results)?;
    let newest = results
        .iter()
        .filter_map(|r| r.as_ref().ok().map(|r| r.source_id))
        .chain(sids.iter().copied())
        .max()
        .unwrap_or(0);
    written.push(WrittenGroup {
        group,
        as_decided: true,
        first_record,
        records: sids,
        first_identity,
        identities: eids,
        newest,
        touched,
    });
    Ok(results)
}

/// A group whose decisions went stale, matched again inside the write transaction.
fn redecide<A>(
    conn: &mut DbConn,
    s: &MpiSettings,
    written: &mut Written,
    m: Matched,
    audit: A,
) -> Result<Vec<Result<FeedResult>>>
where
    A: FnOnce(&mut DbConn, &[Result<FeedResult>]) -> Result<()>,
{
    // Refusals stay; every other position is filled from the decided and online records.
    let mut prepared: Vec<Result<Box<Prepared>>> = m
        .results
        .into_iter()
        .map(|r| match r {
            Some(Err(e)) => Err(e),
            _ => Err(Error::internal("record left undecided")),
        })
        .collect();
    let records = m
        .decided
        .into_iter()
        .map(|d| (d.pos, d.prepared))
        .chain(m.online);
    for (pos, mut p) in records {
        restore_patient(&mut p)?;
        if let Some(slot) = prepared.get_mut(pos) {
            *slot = Ok(p);
        }
    }
    written.matched_again += 1;
    tracing::debug!(
        group = m.group,
        "a feed batch went stale before it was written; matched again"
    );
    let mut again = match_now(conn, s, &m.org, prepared)?;
    again.rows = m.rows;
    let mut alone = Written::default();
    let results = write_group(conn, s, &mut alone, again, None, audit)?;
    let newest = results
        .iter()
        .filter_map(|r| r.as_ref().ok().map(|r| r.source_id))
        .max()
        .unwrap_or(0);
    written.push(WrittenGroup {
        group: m.group,
        as_decided: false,
        first_record: m.first_record,
        records: Vec::new(),
        first_identity: m.first_identity,
        identities: Vec::new(),
        newest,
        touched: None,
    });
    Ok(results)
}

/// New records (the batch path) and the rest (the online path): records already stored or
/// pending, and a second record under one identifier. `existing`: the stored values among the
/// records' identifiers, when already read (all of them in one system). Without `conn`, none
/// is stored but the pending ones (a resident load's).
fn split_new(
    mut conn: Option<&mut DbConn>,
    pending: &[Arc<PendingGroup>],
    prepared: Vec<Accepted>,
    mut existing: Option<HashSet<String>>,
) -> Result<(Vec<Accepted>, Vec<Accepted>)> {
    let mut by_system: HashMap<&str, Vec<&str>> = HashMap::new();
    for (_, p) in &prepared {
        by_system.entry(&p.system).or_default().push(&p.value);
    }
    let mut stored: HashSet<(String, String)> = HashSet::new();
    for (system, values) in by_system {
        let found = match (existing.take(), conn.as_deref_mut()) {
            (Some(e), _) => e,
            (None, Some(c)) => store::existing_values(c, system, &values)?,
            (None, None) => HashSet::new(),
        };
        for v in found {
            stored.insert((system.to_string(), v));
        }
    }
    let mut seen: HashSet<(String, String)> = HashSet::new();
    let (mut fresh, mut online) = (Vec::new(), Vec::new());
    for (pos, p) in prepared {
        let id = (p.system.clone(), p.value.clone());
        if p.merge
            || stored.contains(&id)
            || pending.iter().any(|g| g.identifiers.contains(&id))
            || !seen.insert(id)
        {
            online.push((pos, p));
        } else {
            fresh.push((pos, p));
        }
    }
    Ok((fresh, online))
}

/// The new records with what matching them needs from the database: per record its keys
/// (numbered), per key its pending and stored records newest first, and the stored records
/// any of them may be matched with.
struct Gathered {
    fresh: Vec<Accepted>,
    record_keys: Vec<Vec<usize>>,
    by_key: Vec<Vec<i64>>,
    /// Per record, its stored and pending candidates ranked (`store::rank_candidates`).
    ranked: Vec<Vec<i64>>,
    /// The stored candidates, and where each is by id: the map holds positions, not the
    /// candidates (hundreds of bytes each, hundreds of thousands a bulk batch) — moved into
    /// a map, they were 6 % of a 1M load's CPU in copies.
    stored: Vec<Candidate>,
    stored_at: fnv::FnvHashMap<i64, usize>,
}

fn gather(
    conn: &mut DbConn,
    s: &MpiSettings,
    fresh: Vec<Accepted>,
    pending: &[Arc<PendingGroup>],
    shadow: &HashSet<i64>,
    hits: Option<Vec<(KeyId, i64)>>,
) -> Result<Gathered> {
    let limit = usize::try_from(s.max_candidates).unwrap_or(usize::MAX);
    // The batch's distinct keys, numbered; each record's keys by number.
    let mut numbers: fnv::FnvHashMap<KeyId, usize> = fnv::FnvHashMap::default();
    let mut keys: Vec<KeyId> = Vec::new();
    let record_keys: Vec<Vec<usize>> = fresh
        .iter()
        .map(|(_, p)| {
            p.keys
                .iter()
                .map(|k| {
                    *numbers.entry(*k).or_insert_with(|| {
                        keys.push(*k);
                        keys.len() - 1
                    })
                })
                .collect()
        })
        .collect();
    // Already read (for all of the batch's records, fresh or not), or read now.
    let hits: Vec<(usize, i64)> = match hits {
        Some(hits) => hits
            .into_iter()
            .filter_map(|(key, id)| Some((*numbers.get(&key)?, id)))
            .collect(),
        None => store::key_hits(conn, &keys)?,
    };
    // Each bucket sized once: millions of hits a bulk batch, pushed into buckets growing by
    // doubling, took a third of a gigabyte of fresh memory.
    let mut sizes = vec![0usize; keys.len()];
    for (k, _) in &hits {
        if let Some(n) = sizes.get_mut(*k) {
            *n += 1;
        }
    }
    let mut stored_by_key: Vec<Vec<i64>> = sizes.into_iter().map(Vec::with_capacity).collect();
    for (k, id) in hits {
        if let Some(bucket) = stored_by_key.get_mut(k) {
            if !shadow.contains(&id) {
                bucket.push(id);
            }
        }
    }
    // Per key, the pending records first (newest first), then the stored ones newest first.
    for (k, b) in stored_by_key.iter_mut().enumerate() {
        b.sort_unstable_by(|x, y| y.cmp(x));
        let mut ids: Vec<i64> = pending
            .iter()
            .rev()
            .flat_map(|g| {
                g.keys
                    .get(&keys[k])
                    .into_iter()
                    .flat_map(move |ix| ix.iter().rev().map(move |&i| g.first + i as i64))
            })
            .collect();
        if !ids.is_empty() {
            ids.append(b);
            *b = ids;
        }
        b.truncate(store::BUCKET_READ as usize);
    }
    let ranked: Vec<Vec<i64>> = record_keys
        .iter()
        .map(|ks| {
            let buckets: Vec<&[i64]> = ks.iter().map(|&k| stored_by_key[k].as_slice()).collect();
            store::rank_candidates(&buckets, limit, store::CROWDED)
        })
        .collect();
    // The stored records any of them may be matched with: adding the batch's own records to
    // the buckets only pushes stored ones down the ranking, never up.
    let mut wanted: Vec<i64> = ranked
        .iter()
        .flatten()
        .copied()
        .filter(|id| *id < PENDING)
        .collect();
    wanted.sort_unstable();
    wanted.dedup();
    let mut rows = store::matchable(conn, &wanted)?;
    // Their demographics parsed on two threads when there are many (a bulk load's batch reads
    // hundreds of thousands).
    let stored = if rows.len() >= 4 * PARALLEL_SCORING {
        let second = rows.split_off(rows.len() / 2);
        on_two_threads(
            rows.len() + second.len(),
            |out| Candidate::extend_of_rows(out, rows),
            || Candidate::of_rows(second),
        )
    } else {
        Candidate::of_rows(rows)
    };
    let stored_at = stored.iter().enumerate().map(|(i, c)| (c.id, i)).collect();
    Ok(Gathered {
        fresh,
        record_keys,
        by_key: stored_by_key,
        ranked,
        stored,
        stored_at,
    })
}

/// Matches the new records in order, each against the stored candidates of its keys, the
/// pending groups' records and the batch's earlier records. Returns the decided records, those
/// left to the online path, and the decided ones as candidates (pending ids from
/// `first_record`).
fn decide(
    s: &MpiSettings,
    org: &Organization,
    gathered: Gathered,
    pending: &[Arc<PendingGroup>],
    first_record: i64,
    first_identity: i64,
) -> (Vec<Decided>, Vec<Accepted>, Vec<Candidate>) {
    let limit = usize::try_from(s.max_candidates).unwrap_or(usize::MAX);
    let Gathered {
        fresh,
        record_keys,
        by_key: stored_by_key,
        ranked: stored_ranked,
        stored,
        stored_at,
    } = gathered;
    let pending_record = |id: i64| -> Option<&Candidate> {
        pending.iter().find_map(|g| {
            let k = usize::try_from(id.checked_sub(g.first)?).ok()?;
            g.records.get(k)
        })
    };

    let candidate = |id: i64| -> Option<&Candidate> {
        if id >= PENDING {
            pending_record(id)
        } else {
            stored_at.get(&id).and_then(|&i| stored.get(i))
        }
    };
    // Each record against its stored and pending candidates: scored ahead, on two threads
    // for a large batch (a bulk load's matching is mostly scoring). What the batch's own
    // earlier records add is scored below, in order.
    // A record's candidates are looked up, and their sketches fetched from memory, while the
    // record before it is scored: the candidates are scattered over hundreds of megabytes, and
    // each rejection is quicker than a wait for memory (`score::Sketch`).
    let look_up = |ids: &[i64]| -> Vec<Option<&Candidate>> {
        ids.iter()
            .map(|&id| candidate(id).inspect(|c| prefetch(&c.sketch)))
            .collect()
    };
    let prescore = |records: &[Accepted], ranked: &[Vec<i64>]| -> Vec<Prescored> {
        let mut next = ranked.first().map(|r| look_up(r));
        let mut out = Vec::with_capacity(records.len());
        for (i, (_, p)) in records.iter().enumerate() {
            let cands = next.take().unwrap_or_default();
            next = ranked.get(i + 1).map(|r| look_up(r));
            out.push(
                cands
                    .into_iter()
                    .map(|c| c.and_then(|c| review_score(s, &p.demo, &p.sketch, c)))
                    .collect(),
            );
        }
        out
    };
    let prescored: Vec<Prescored> = if fresh.len() >= PARALLEL_SCORING {
        let half = fresh.len() / 2;
        on_two_threads(
            fresh.len(),
            |out| out.extend(prescore(&fresh[..half], &stored_ranked[..half])),
            || prescore(&fresh[half..], &stored_ranked[half..]),
        )
    } else {
        prescore(&fresh, &stored_ranked)
    };

    let mut decided: Vec<Decided> = Vec::with_capacity(fresh.len());
    let mut deferred = Vec::new();
    // The batch's decided records as candidates, and their keys.
    let mut batch: Vec<Candidate> = Vec::with_capacity(fresh.len());
    let mut batch_by_key: Vec<Vec<usize>> = vec![Vec::new(); stored_by_key.len()];
    let mut new_identities = 0i64;
    let none = HashSet::new();
    let ahead = stored_ranked.into_iter().zip(prescored);
    for (((pos, p), ks), (ranked_ahead, scores)) in fresh.into_iter().zip(record_keys).zip(ahead) {
        // The batch's records rank as newer than any pending or stored one; with none under
        // its keys, the ranking is the one scored ahead.
        let reranked;
        let ranked = if ks.iter().all(|&k| batch_by_key[k].is_empty()) {
            &ranked_ahead
        } else {
            let buckets: Vec<Vec<i64>> = ks
                .iter()
                .map(|&k| {
                    let mut b: Vec<i64> = batch_by_key[k]
                        .iter()
                        .rev()
                        .map(|&j| first_record + j as i64)
                        .collect();
                    b.extend(&stored_by_key[k]);
                    b.truncate(store::BUCKET_READ as usize);
                    b
                })
                .collect();
            reranked = store::rank_candidates(&buckets, limit, store::CROWDED);
            &reranked
        };
        let cands: Vec<&Candidate> = ranked
            .iter()
            .filter_map(|&id| {
                if id >= first_record {
                    batch.get((id - first_record) as usize)
                } else {
                    candidate(id)
                }
            })
            .collect();
        // Scored ahead, or (a batch record; a stored one the batch's records pushed into the
        // ranking) scored now: the same function either way.
        let eval = evaluate_scored(s, org.id.as_str(), &cands, &none, |c| {
            match ranked_ahead.iter().position(|&id| id == c.id) {
                Some(i) if c.id < first_record => scores[i].clone(),
                _ => review_score(s, &p.demo, &p.sketch, c),
            }
        });
        if !eval.merges.is_empty() {
            deferred.push((pos, p));
            continue;
        }
        let eid = match &eval.link {
            Some(l) => l.enterprise_id,
            None => {
                new_identities += 1;
                first_identity + new_identities - 1
            }
        };
        let k = batch.len();
        batch.push(Candidate {
            sketch: p.sketch.clone(),
            id: first_record + k as i64,
            org_id: org.id.to_string(),
            enterprise_id: eid,
            demo: p.demo.clone(),
        });
        for &key in &ks {
            batch_by_key[key].push(k);
        }
        decided.push(Decided {
            pos,
            prepared: p,
            eid,
            eval,
        });
    }
    (decided, deferred, batch)
}

/// Asks the processor to bring `x` into its cache (a hint: nothing is read, nothing can fail).
#[inline]
fn prefetch<T>(x: &T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: SSE is part of every x86_64 processor, and a prefetch neither reads nor faults,
    // whatever the address.
    unsafe {
        core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(
            (x as *const T).cast(),
        )
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = x;
}

/// `first` here and `second` on another thread, their results in that order, in one vector
/// of `capacity` that `first` fills first (extended by the second half, a vector of half a
/// batch's candidates was copied into fresh memory). A panic in either goes on as it would on
/// one thread.
fn on_two_threads<T: Send>(
    capacity: usize,
    first: impl FnOnce(&mut Vec<T>),
    second: impl FnOnce() -> Vec<T> + Send,
) -> Vec<T> {
    std::thread::scope(|scope| {
        let second = scope.spawn(second);
        let mut all = Vec::with_capacity(capacity);
        first(&mut all);
        all.extend(
            second
                .join()
                .unwrap_or_else(|e| std::panic::resume_unwind(e)),
        );
        all
    })
}

/// A batch at least this large has its stored candidates scored on two threads (the cost of a
/// thread is a few dozen records' scoring; the HTTP feed's batches of single PUTs stay below
/// it, a Bundle or a file does not).
const PARALLEL_SCORING: usize = 32;

/// One record's score against each of its ranked stored and pending candidates (`None`:
/// below the review threshold).
type Prescored = Vec<Option<Score>>;

/// The real ids behind a group's pending ones: its own, allocated now, and those of the
/// groups written before it.
struct Ids<'a> {
    first_record: i64,
    sids: &'a [i64],
    first_identity: i64,
    eids: &'a [i64],
    written: &'a Written,
}

impl Ids<'_> {
    fn own(first: i64, ids: &[i64], id: i64) -> Option<i64> {
        let k = usize::try_from(id.checked_sub(first)?).ok()?;
        ids.get(k).copied()
    }

    /// The real id of a source record (`identity` false) or an identity.
    fn real(&self, id: i64, identity: bool) -> Result<i64> {
        if id < PENDING {
            return Ok(id);
        }
        let (first, ids) = if identity {
            (self.first_identity, self.eids)
        } else {
            (self.first_record, self.sids)
        };
        Self::own(first, ids, id)
            .or_else(|| self.written.resolve(id, identity))
            .ok_or_else(|| Error::internal("a pending record or identity was never written"))
    }

    fn record(&self, id: i64) -> Result<i64> {
        self.real(id, false)
    }

    fn identity(&self, id: i64) -> Result<i64> {
        self.real(id, true)
    }

    fn is_new_identity(&self, id: i64) -> bool {
        Self::own(self.first_identity, self.eids, id).is_some()
    }
}

/// Writes every row of the decided records, rebuilds the stored identities they joined. With
/// `rows`, each result carries its record's row as written.
fn write_decided(
    conn: &mut DbConn,
    org: &Organization,
    ids: &Ids,
    decided: Vec<Decided>,
    now: i64,
    rows_in_results: bool,
    results: &mut [Option<Result<FeedResult>>],
) -> Result<()> {
    if decided.is_empty() {
        return Ok(());
    }
    // Sized up front: grown push by push, the vectors of a 50,000-record batch were copied
    // and faulted in again and again (a sixth of this function's own time in a profile).
    let mut rows = BulkRows {
        identities: Vec::with_capacity(ids.eids.len()),
        sources: Vec::with_capacity(decided.len()),
        identifiers: Vec::with_capacity(decided.iter().map(|d| d.prepared.ids.len()).sum()),
        keys: Vec::with_capacity(decided.iter().map(|d| d.prepared.keys.len()).sum()),
        decisions: Vec::with_capacity(decided.len()),
        ..BulkRows::default()
    };
    // Members the group adds to each person, newest first (survivorship).
    let mut members: HashMap<i64, Vec<&Prepared>> = HashMap::new();
    for d in decided.iter().rev() {
        members.entry(d.eid).or_default().push(&d.prepared);
    }
    // The stored people new records joined: their golden records are the new members' over
    // the stored one.
    let mut joined: HashMap<i64, Vec<&Value>> = HashMap::new();
    for (eid, ps) in members
        .iter()
        .filter(|(eid, _)| !ids.is_new_identity(**eid))
    {
        let stored = joined.entry(ids.identity(*eid)?).or_default();
        stored.extend(ps.iter().map(|p| &p.patient));
    }
    if !joined.is_empty() {
        ids.written.committed()?;
    }
    let joined = joined_goldens(conn, joined)?;
    for (n, &id) in ids.eids.iter().enumerate() {
        let golden = match members
            .get(&(ids.first_identity + n as i64))
            .map(Vec::as_slice)
        {
            Some([only]) => only.golden.clone(),
            Some(several) => golden(&several.iter().map(|p| &p.patient).collect::<Vec<_>>()),
            None => "{}".into(),
        };
        rows.identities.push(NewIdentity {
            id,
            status: "active".into(),
            merged_into: None,
            golden,
            created_at: now,
            updated_at: now,
        });
    }
    drop(members);
    for (k, d) in decided.into_iter().enumerate() {
        let source_id = ids.sids[k];
        let enterprise_id = ids.identity(d.eid)?;
        let p = d.prepared;
        let c = p.content;
        rows.sources.push(NewSource {
            id: source_id,
            org_id: org.id.to_string(),
            system: p.system,
            value: p.value,
            enterprise_id,
            status: "active".into(),
            link_kind: if d.eval.link.is_some() { "auto" } else { "new" }.into(),
            version: 1,
            resource: c.resource,
            family: c.family,
            given: c.given,
            family_phonetic: c.family_phonetic,
            given_phonetic: c.given_phonetic,
            birth_date: c.birth_date,
            gender: c.gender,
            postcode: c.postcode,
            phone: c.phone,
            demographics: c.demographics,
            created_at: now,
            updated_at: now,
        });
        rows.identifiers
            .extend(p.ids.into_iter().map(|(s, v)| (s, v, source_id)));
        rows.keys
            .extend(p.keys.into_iter().map(|key| (key, source_id)));
        let best = d.eval.best();
        rows.decisions.push(NewDecision {
            source_id,
            candidate_id: best.map(|b| ids.record(b.source_id)).transpose()?,
            outcome: d.eval.outcome().into(),
            score: best.map(|b| b.score.total),
            breakdown: d.eval.stored_breakdown(),
            created_at: now,
        });
        for (c, kind) in &d.eval.reviews {
            rows.reviews.push(NewReview::new(
                source_id,
                ids.record(c.source_id)?,
                kind,
                c.score.total,
                c.score.stored(),
                now,
            ));
        }
        if let Some(l) = &d.eval.link {
            let detail = json!({ "source": source_id, "candidate": ids.record(l.source_id)?, "score": l.score.total });
            rows.history.push(NewHistory {
                enterprise_id,
                action: "link".into(),
                detail: detail.to_string(),
                actor: None,
                created_at: now,
            });
        }
        results[d.pos] = Some(Ok(FeedResult {
            source_id,
            enterprise_id,
            created: true,
            outcome: d.eval.outcome().into(),
            score: best.map(|b| (b.score.total * 10.0).round() / 10.0),
            reviews_queued: d.eval.reviews.len(),
            stored: rows_in_results
                .then(|| rows.sources.last().map(|r| Box::new(r.stored())))
                .flatten(),
        }));
    }
    store::insert_bulk(conn, rows)?;
    for chunk in joined.chunks(1000) {
        store::set_goldens(conn, chunk, now)?;
        // A new record brings no consent of its own: it takes its person's restrictions.
        let eids: Vec<i64> = chunk.iter().map(|(eid, _)| *eid).collect();
        for eid in crate::db::consent::with_directives(conn, &eids)? {
            crate::db::consent::refresh_hides(conn, eid)?;
            // Its row as written no longer holds.
            for r in results.iter_mut().flatten().flatten() {
                if r.enterprise_id == eid {
                    r.stored = None;
                }
            }
        }
    }
    Ok(())
}

/// How much less CPU than the writer the threads around it get where they share a core
/// (`behind_the_writer`): a nice value, relative to the process's.
const BEHIND_THE_WRITER: i32 = 5;

/// Lowers the calling thread's CPU priority, and so that of the threads it starts from now
/// on (Linux gives each thread its own nice value, inherited at its start), below the writer
/// of a bulk load: the threads that read, prepare and match its batches yield the writer the
/// core they share with it. The writer is the load's busiest thread and the others wait on
/// it; on two cores it had waited 6–8 s of a 1M load's first member for a core held by them
/// (BENCHMARKS.md, session 28). Raising one's own nice value needs no privilege; where it
/// fails, nothing changes.
pub fn behind_the_writer() {
    #[cfg(target_os = "linux")]
    // SAFETY: plain system calls about the calling thread, no memory passed.
    unsafe {
        let me = libc::gettid() as libc::id_t;
        let now = libc::getpriority(libc::PRIO_PROCESS, me);
        libc::setpriority(libc::PRIO_PROCESS, me, now + BEHIND_THE_WRITER);
    }
}

/// The golden records of stored people that records joined (`new`: each person's new member
/// resources, newest first). Survivorship takes each field from the newest record that has
/// it, and the new records are the newest, so a person's golden record is theirs over the one
/// stored — which was built by the same rule at the person's last change — without reading
/// the older records.
fn joined_goldens(conn: &mut DbConn, new: HashMap<i64, Vec<&Value>>) -> Result<Vec<(i64, String)>> {
    let mut eids: Vec<i64> = new.keys().copied().collect();
    eids.sort_unstable();
    let mut goldens = Vec::with_capacity(eids.len());
    for chunk in eids.chunks(1000) {
        for row in store::get_identities(conn, chunk)? {
            let stored: Value = serde_json::from_str(&row.golden).unwrap_or(Value::Null);
            let mut resources: Vec<&Value> = new.get(&row.id).cloned().unwrap_or_default();
            resources.push(&stored);
            goldens.push((row.id, golden(&resources)));
        }
    }
    Ok(goldens)
}

#[cfg(test)]
mod tests {
    #[cfg(target_os = "linux")]
    #[test]
    fn behind_the_writer_lowers_this_thread_and_those_it_starts_not_the_others() {
        fn nice() -> i32 {
            // SAFETY: a plain system call about the calling thread.
            unsafe { libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t) }
        }
        let before = nice();
        let (own, started) = std::thread::spawn(|| {
            let before = nice();
            super::behind_the_writer();
            let started = std::thread::spawn(nice).join().expect("thread");
            (nice() - before, started - before)
        })
        .join()
        .expect("thread");
        let expected = super::BEHIND_THE_WRITER.min(19 - before);
        assert_eq!((own, started), (expected, expected));
        assert_eq!(
            nice(),
            before,
            "the thread that did not ask keeps its priority"
        );
    }
}
