"""Which requests are part of the job: the one rule every reader of both backends applies.

A request is *live* when the manifest last synced produces its key: `sync()` stamps every key it expands
with the job's new `sync_gen`, so live means `requests.sync_gen` equals the job's. Every other request is
kept (its attempts, images and files stay; nothing is deleted) but is no longer part of the job's results,
whatever its state: a pending or failed one is marked `removed` so it is never submitted, one in flight is
still collected (its task was paid for), a done one keeps its images. When its row comes back, the next
sync stamps it again and it is live with what it had: a done request sends nothing.

Why the generation and not a state: a done or in-flight request must keep its state (the engine collects
it, a returning row gets its images back), and the fingerprint fast path of `sync()` leaves the generation
as it was, so an unchanged manifest costs no write. The fragments below are the rule as SQL; the readers
(status, export, report, results.csv, index.jsonl, reviews) filter with them, and an index on
(sync_gen, state) keeps that a range scan on a million-request job.
"""

# SQLite: one job per file, its row has id 1.
SQLITE_LIVE = "sync_gen = (SELECT sync_gen FROM job WHERE id = 1)"
# PostgreSQL: several jobs per database; the job's id is the query's named parameter `job`.
POSTGRES_LIVE = "sync_gen = (SELECT sync_gen FROM jobs WHERE id = %(job)s)"
