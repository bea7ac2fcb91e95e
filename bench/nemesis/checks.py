"""The nemesis's checks, as pure functions of what the clients recorded and
what each broker answered after healing. Each returns violations: one line
each, with evidence (counts and the first examples)."""

from __future__ import annotations

import re
from collections import defaultdict

from load import parse_value
from wire import KAFKA_STORAGE_ERROR

EXAMPLES = 5

# How a failed delivery report is classified (check 3). librdkafka's
# idempotent producer (src/rdkafka_request.c, rd_kafka_handle_Produce_error
# and rd_kafka_err_action) gives each failed message a persistence status:
# NOT_PERSISTED ("never transmitted, or failed with an error indicating it
# was not written to the log") or POSSIBLY_PERSISTED ("transmitted, but no
# acknowledgement received"). confluent-kafka-python does not expose that
# status, so the error name stands in for it:
#
# - Unknown fate, never a violation when found in the log:
#   _MSG_TIMED_OUT (message.timeout.ms expired; if the message was ever in
#   flight it may have landed), _TIMED_OUT, _TRANSPORT, _SSL,
#   REQUEST_TIMED_OUT, NOT_ENOUGH_REPLICAS_AFTER_APPEND, _PURGE_INFLIGHT,
#   _BAD_MSG (all POSSIBLY_PERSISTED in librdkafka's tables), the
#   idempotence errors OUT_OF_ORDER_SEQUENCE_NUMBER and
#   DUPLICATE_SEQUENCE_NUMBER (POSSIBLY_PERSISTED there too), and the
#   producer-wide fatal states (_FATAL, _GAPLESS_GUARANTEE, _FENCED,
#   _INCONSISTENT, _STATE), which fail messages regardless of their fate.
# - Definite ("not persisted"): every other error, e.g. KAFKA_STORAGE_ERROR,
#   NOT_ENOUGH_REPLICAS, UNKNOWN_TOPIC_OR_PART, UNKNOWN_PRODUCER_ID,
#   INVALID_PRODUCER_EPOCH, MSG_SIZE_TOO_LARGE, INVALID_RECORD,
#   TOPIC_AUTHORIZATION_FAILED, _PURGE_QUEUE: librdkafka marks them
#   NOT_PERSISTED, i.e. the broker said it did not write the batch.
#
# One caveat, stated with any such violation: librdkafka never downgrades a
# message from POSSIBLY_PERSISTED to NOT_PERSISTED, but the error it reports
# is the last attempt's. A message whose earlier attempt was in flight and
# unanswered, and whose final attempt got a definite error, may be in the
# log although its report names a definite error. With an idempotent
# producer the retriable definite errors are retried until
# message.timeout.ms and then reported as _MSG_TIMED_OUT, so a definite name
# in a report is normally a permanent error, where this does not arise.
UNKNOWN_FATE = {
    "_MSG_TIMED_OUT", "_TIMED_OUT", "_TIMED_OUT_QUEUE", "_TRANSPORT", "_SSL", "REQUEST_TIMED_OUT",
    "NOT_ENOUGH_REPLICAS_AFTER_APPEND", "_PURGE_INFLIGHT", "_BAD_MSG",
    "OUT_OF_ORDER_SEQUENCE_NUMBER", "DUPLICATE_SEQUENCE_NUMBER",
    "_FATAL", "_GAPLESS_GUARANTEE", "_FENCED", "_INCONSISTENT", "_STATE",
}


def definite(error_name: str) -> bool:
    return error_name not in UNKNOWN_FATE


def _ex(items):
    items = list(items)
    return "; ".join(str(i) for i in items[:EXAMPLES]) + (" …" if len(items) > EXAMPLES else "")


def _short(v):
    return v.decode("ascii", "replace") if isinstance(v, (bytes, bytearray)) else repr(v)


# --------------------------------------------------------------------------
def check_acked(acked, logs, skip=frozenset()):
    """1. Every acknowledged record is at its acknowledged (partition,
    offset) with its value, through every broker; no offset below 0.
    `skip`: (broker, partition) pairs that could not be read whole."""
    out = []
    bad = [(p, o, v) for p, o, v, _t in acked if o is None or o < 0]
    if bad:
        out.append("check1: %d acknowledgements with offset < 0, e.g. %s"
                   % (len(bad), _ex("%s at p%d@%s" % (_short(v), p, o) for p, o, v in bad)))
    for b, log in sorted(logs.items()):
        miss = []
        for p, o, v, t in acked:
            if o is None or o < 0 or (b, p) in skip:
                continue
            got = log.get(p, {}).get(o)
            if got != v:
                miss.append("%s acked at p%d@%d (t=%.1fs), %s has %s there"
                            % (_short(v), p, o, t, b, "nothing" if got is None else _short(got)))
        if miss:
            out.append("check1: %d of %d acknowledged records not at their offset through %s, e.g. %s"
                       % (len(miss), len(acked), b, _ex(miss)))
    return out


def _meta(meta, p, o):
    m = meta.get((p, o)) if meta else None
    return " [pid %d epoch %d seq %d]" % m if m else ""


def duplicates(log):
    """{value: [(partition, offset), ...]} of every value found more than once."""
    where = defaultdict(list)
    for p, recs in log.items():
        for o, v in recs.items():
            where[v].append((p, o))
    return {v: ws for v, ws in where.items() if len(ws) > 1}


def check_no_duplicates(name, log, acked, meta=None):
    """2. No value twice in the log (idempotent producers)."""
    dups = duplicates(log)
    if not dups:
        return []
    ack = {v: (p, o, t) for p, o, v, t in acked}

    def show(v, ws):
        a = ack.get(v)
        return "%s at %s (%s)" % (_short(v), ", ".join("p%d@%d%s" % (w + (_meta(meta, *w),)) for w in ws),
                                  "acked at p%d@%d t=%.1fs" % a if a else "not acked")
    return ["check2: %d values appear more than once through %s, e.g. %s"
            % (len(dups), name, _ex(show(v, ws) for v, ws in sorted(dups.items(), key=lambda kv: kv[1])))]


def check_failed_absent(name, failed, log):
    """3. A value whose delivery failed with a definite ("not persisted")
    error is not in the log. Returns (violations, unknown-fate values found)."""
    present = {}
    for p, recs in log.items():
        for o, v in recs.items():
            present[v] = (p, o)
    bad, unknown_in_log = [], 0
    for v, err, t in failed:
        if v in present:
            if definite(err):
                bad.append("%s failed with %s at t=%.1fs, in the log at p%d@%d" % ((_short(v), err, t) + present[v]))
            else:
                unknown_in_log += 1
    out = []
    if bad:
        out.append("check3: %d records answered with a definite error are in the log through %s, e.g. %s "
                   "(caveat: an earlier unanswered attempt of the same message may have landed; see checks.py)"
                   % (len(bad), name, _ex(bad)))
    return out, unknown_in_log


def check_contiguous_and_identical(reads, starts, hws, read_errors, skip=frozenset()):
    """4. Offsets contiguous from the log start up to the high watermark,
    and the same (offset, value) sequence through every broker. Error
    answers while reading below the high watermark are violations, except
    KAFKA_STORAGE_ERROR (a failed object-store read with faults injected,
    retriable), which is returned as a note; a read that never completes
    shows as offsets missing. Returns (violations, notes)."""
    out = []
    for b, parts in sorted(reads.items()):
        for p, recs in sorted(parts.items()):
            if (b, p) in skip:
                continue
            start, hw = starts[b].get(p), hws[b].get(p)
            offs = [o for o, _ in recs]
            if start is None or hw is None:
                out.append("check4: %s gave no log start / high watermark for p%d" % (b, p))
                continue
            if offs != list(range(start, hw)):
                gaps = []
                expect = start
                for o in offs:
                    if o != expect:
                        gaps.append("expected %d, got %d" % (expect, o))
                    expect = o + 1
                if expect != hw:
                    gaps.append("read up to %d of [%d, %d)" % (expect, start, hw))
                out.append("check4: %s p%d: offsets not contiguous from the log start %d to the high watermark %d: %s"
                           % (b, p, start, hw, _ex(gaps)))
    notes = []
    for b, errs in sorted(read_errors.items()):
        storage = sum(1 for p, e in errs.items() for code, _o, _t in e if code == KAFKA_STORAGE_ERROR)
        other = ["p%d %s" % (p, t) for p, e in sorted(errs.items()) for code, _o, t in e
                 if code != KAFKA_STORAGE_ERROR]
        if other:
            out.append("check4: %s answered %d errors other than KAFKA_STORAGE_ERROR while the healed log was "
                       "read below its high watermark, e.g. %s" % (b, len(other), _ex(other)))
        if storage:
            notes.append("%s answered KAFKA_STORAGE_ERROR %d times to the final reads (retried with smaller "
                         "fetches)" % (b, storage))
    names = sorted(reads)
    if len({tuple(sorted(starts[b].items())) for b in names}) > 1:
        out.append("check4: log starts differ between brokers: %s" % {b: starts[b] for b in names})
    ref = names[0] if names else None
    for b in names[1:]:
        for p in sorted(set(reads[ref]) | set(reads[b])):
            if (ref, p) in skip or (b, p) in skip:
                continue
            x, y = reads[ref].get(p, []), reads[b].get(p, [])
            if x != y:
                diff = next((i for i, (a, c) in enumerate(zip(x, y)) if a != c), min(len(x), len(y)))
                ea = "%d:%s" % (x[diff][0], _short(x[diff][1])) if diff < len(x) else "end"
                eb = "%d:%s" % (y[diff][0], _short(y[diff][1])) if diff < len(y) else "end"
                out.append("check4: p%d differs between %s (%d records) and %s (%d records) from index %d: %s vs %s"
                           % (p, ref, len(x), b, len(y), diff, ea, eb))
    return out, notes


def check_order(name, log, produced, meta=None):
    """5. Each producer's counter increases with the offset in every
    partition; every value in the log was produced by the nemesis."""
    out = []
    last = {}
    bad, unknown = [], []
    for p in sorted(log):
        for o in sorted(log[p]):
            v = log[p][o]
            pv = parse_value(v)
            if pv is None or pv[1] >= produced.get(pv[0], 0):
                unknown.append("%s at p%d@%d" % (_short(v), p, o))
                continue
            key = (pv[0], p)
            if key in last and pv[1] <= last[key][1]:
                bad.append("p%d: P%d:%d at offset %d%s after P%d:%d at offset %d%s"
                           % (p, pv[0], pv[1], o, _meta(meta, p, o), pv[0], last[key][1], last[key][0],
                              _meta(meta, p, last[key][0])))
            last[key] = (o, pv[1])
    if bad:
        out.append("check5: %d records out of their producer's order through %s, e.g. %s" % (len(bad), name, _ex(bad)))
    if unknown:
        out.append("check5: %d records in the log that no nemesis producer sent through %s, e.g. %s"
                   % (len(unknown), name, _ex(unknown)))
    return out


def check_reads(reads, log, jumps, group_starts, assignments, commit_obs):
    """What the consumers read during the run: every record they got is the
    one the log holds at that offset; assigned consumers read each partition
    contiguously from 0; group members contiguously within an assignment,
    starting at or after every offset committed before they were assigned."""
    out = []
    for who, recs in sorted(reads.items()):
        # (a partition no broker could read whole is not judged here)
        bad = [(p, o, v) for p, o, v in recs if log.get(p) and log[p].get(o) != v]
        if bad:
            out.append("reads: %s got %d records that are not what the log holds at their offset, e.g. %s"
                       % (who, len(bad), _ex("%s at p%d@%d (log: %s)" % (_short(v), p, o, _short(log.get(p, {}).get(o)))
                                             for p, o, v in bad)))
    if jumps:
        per = defaultdict(list)
        for t, who, p, want, got, kind in jumps:
            per[who].append("t=%.1fs p%d: expected offset %d, got %d: %s" % (t, p, want, got, kind))
        for who, items in sorted(per.items()):
            out.append("check6/7: consumer %s jumped %d times (an offset reset?), e.g. %s" % (who, len(items), _ex(items)))
    assigned_at = defaultdict(list)
    for t, who, what, ps in assignments:
        if what == "assign":
            for p in ps:
                assigned_at[(who, p)].append(t)
    bad = []
    for t, who, p, first in group_starts:
        ts = [a for a in assigned_at[(who, p)] if a <= t]
        if not ts:
            continue
        ta = max(ts)
        before = [(o, src, e) for s, e, pp, o, src in commit_obs if pp == p and e < ta and o > first]
        if before:
            o, src, e = max(before)
            bad.append("%s assigned p%d at t=%.1fs started at offset %d, below offset %d committed "
                       "(%s, answered t=%.1fs)" % (who, p, ta, first, o, src, e))
    if bad:
        out.append("check6: %d group assignments started below an offset committed before them, e.g. %s"
                   % (len(bad), _ex(bad)))
    return out


def check_group_exclusive(assignments, end, grace):
    """6. A partition is held by one group member at a time: with the
    classic (eager) protocol a member revokes before anyone is assigned
    again. A member cut off from its coordinator may keep its partitions
    until its session times out, so overlaps up to `grace` seconds pass;
    longer ones mean two generations were live at once."""
    held = defaultdict(list)  # partition -> [(member, from, to)]
    open_ = {}
    for t, who, what, ps in sorted(assignments):
        for p in ps:
            if what == "assign":
                open_[(who, p)] = t
            elif (who, p) in open_:
                held[p].append((who, open_.pop((who, p)), t))
    for (who, p), t in open_.items():
        held[p].append((who, t, end))
    bad = []
    for p, spans in sorted(held.items()):
        for i, (a, a0, a1) in enumerate(spans):
            for b, b0, b1 in spans[i + 1:]:
                if a == b:
                    continue
                overlap = min(a1, b1) - max(a0, b0)
                if overlap > grace:
                    bad.append("p%d held by %s (t=%.1f-%.1fs) and %s (t=%.1f-%.1fs) at once for %.1fs"
                               % (p, a, a0, a1, b, b0, b1, overlap))
    if not bad:
        return []
    return ["check6: %d times two group members held one partition at once for longer than %.0fs "
            "(two live generations?), e.g. %s" % (len(bad), grace, _ex(bad))]


def check_commits_monotonic(commit_obs, hw):
    """6. Committed group offsets never go backwards: an observation that
    began after another one ended never shows a lower offset (the
    observations are commits answered and offsets read back, each an
    interval [start, end]); and no committed offset is past the end."""
    out = []
    by_p = defaultdict(list)
    for s, e, p, o, src in commit_obs:
        by_p[p].append((s, e, o, src))
    bad = []
    for p, obs in sorted(by_p.items()):
        ends = sorted(obs, key=lambda x: x[1])
        starts = sorted(obs, key=lambda x: x[0])
        best = None  # highest offset among observations ended so far
        i = 0
        for s, e, o, src in starts:
            while i < len(ends) and ends[i][1] < s:
                if best is None or ends[i][2] > best[2]:
                    best = ends[i]
                i += 1
            if best is not None and o < best[2]:
                bad.append("p%d: %d (%s, t=%.1f-%.1fs) after %d (%s, t=%.1f-%.1fs)"
                           % (p, o, src, s, e, best[2], best[3], best[0], best[1]))
        past = [(o, src) for s, e, o, src in obs if hw.get(p) is not None and o > hw[p]]
        if past:
            bad.append("p%d: committed %d (%s) past the high watermark %d" % (p, past[0][0], past[0][1], hw[p]))
    if bad:
        out.append("check6: committed offsets went backwards %d times, e.g. %s" % (len(bad), _ex(bad)))
    return out


LOG_PATTERNS = [
    ("panicked", re.compile(r"panicked")),
    ("stopped learning commits", re.compile(r"a gap|commit log is corrupt")),
]


def check_broker_logs(brokers):
    """Broker logs: a panic, or a committer that found the log corrupt (a
    gap) and stopped learning commits."""
    out = []
    for b in brokers:
        lines = b.log_text().splitlines()
        for what, rx in LOG_PATTERNS:
            hits = [(i, l) for i, l in enumerate(lines) if rx.search(l)]
            if hits:
                i, l = hits[0]
                out.append("log: %s %s (%d lines), first at line %d of %s: %s"
                           % (b.component, what, len(hits), i + 1, b.log_path, l.strip()[:400]))
    return out
