-- persona-screen results schema (DuckDB). Users write SQL against these tables and the views in views.sql.
-- Rerunning a screen never duplicates a row. `records`, `turns` and `scores` carry no PRIMARY KEY: the
-- store writes only what it has checked is not stored yet (screener/store.py, one transaction a chunk),
-- and DuckDB's key indexes grew with the rows in memory and on disk (benchmarks/RESULTS.md, 2026-12-03);
-- their keys are named in a comment. Databases of earlier versions keep theirs.

CREATE TABLE IF NOT EXISTS runs (
    run_id        VARCHAR PRIMARY KEY,   -- hash of everything that determines the values
    model         VARCHAR NOT NULL,      -- the model spec as given (path, hub id or "default")
    model_sha256  VARCHAR NOT NULL,      -- sha256 of the weight files
    dataset_uri   VARCHAR NOT NULL,
    mode          VARCHAR NOT NULL CHECK (mode IN ('proxy', 'natural')),
    layers        INTEGER[] NOT NULL,
    traits        VARCHAR[] NOT NULL,
    settings      JSON NOT NULL,         -- dtype, max_tokens, turns, split, generation, vector files
    started_at    TIMESTAMP NOT NULL,    -- UTC
    finished_at   TIMESTAMP,             -- UTC; NULL while running, after a crash, or once resumed
    n_scored      BIGINT NOT NULL DEFAULT 0,
    n_rejected    BIGINT NOT NULL DEFAULT 0,  -- rejects of kind 'bad'
    status        VARCHAR DEFAULT 'running',  -- running (or stopped without a word: killed), failed, finished
    error         VARCHAR,               -- why it failed (status 'failed')
    n_unreadable_files BIGINT DEFAULT 0, -- rejects of kind 'file'
    n_skipped     BIGINT DEFAULT 0,      -- rejects of kind 'skipped'
    input_rows    BIGINT                 -- rows the finished screen read, to the input's end (NULL: --limit
                                         -- stopped it, or not finished): export refuses rows added after them
);

-- A scored record's messages, stored once: each scored turn (table `turns`) points into them, so the
-- database grows with the input, not with the square of a conversation's turns. The `samples` view
-- (sql/samples.sql) gives every turn's prompt and response as text again.
CREATE TABLE IF NOT EXISTS records (
    run_id            VARCHAR NOT NULL,
    source_row        BIGINT NOT NULL,   -- 0-based record index over the whole dataset
    source_file       VARCHAR NOT NULL,
    messages          JSON NOT NULL,     -- the normalised messages through the last scored assistant turn
    complete          BOOLEAN,           -- every item the reader gave the row is committed (false: --limit
                                         -- stopped inside it; NULL: not known, an earlier version's row)
    -- key: (run_id, source_row)
);

-- One row per scored sample (an assistant turn): where it is in its record, and what the model read.
CREATE TABLE IF NOT EXISTS turns (
    run_id            VARCHAR NOT NULL,
    sample_id         VARCHAR NOT NULL,  -- the record's own id (suffixed '#<turn>' under --turns all) or a content hash; '<id>@<row>' when an earlier record gave it
    source_row        BIGINT NOT NULL,   -- its record (records.source_row)
    turn              INTEGER NOT NULL,  -- index of the scored turn among the record's assistant turns
    prompt_messages   INTEGER NOT NULL,  -- the prompt is the record's first N messages; the response is message N's content
    prompt_tokens     INTEGER NOT NULL,
    response_tokens   INTEGER NOT NULL,
    truncated         BOOLEAN NOT NULL,  -- prompt or response cut to --max-tokens
    natural_response  VARCHAR,           -- base model's own response (natural mode)
    natural_tokens    INTEGER,
    content_sha256    VARCHAR,           -- of the prompt and response as scored (screener.records.content_sha256):
                                         -- export, explain and report refuse an input whose sample is not this one
    -- key: (run_id, sample_id)
);

CREATE TABLE IF NOT EXISTS scores (
    run_id            VARCHAR NOT NULL,
    sample_id         VARCHAR NOT NULL,
    trait             VARCHAR NOT NULL,
    layer             INTEGER NOT NULL,  -- hidden_states index: 0 = embeddings, L = output of block L
    proj_response     DOUBLE NOT NULL,   -- mean over response tokens of h_L · v̂
    proj_prompt_last  DOUBLE NOT NULL,   -- h_L at the last prompt token · v̂
    proj_natural      DOUBLE,            -- mean over the natural response's tokens (natural mode)
    delta_p           DOUBLE,            -- proj_response - proj_natural (natural mode)
    delta_p_proxy     DOUBLE NOT NULL,   -- proj_response - proj_prompt_last
    -- key: (run_id, sample_id, trait, layer)
);

CREATE TABLE IF NOT EXISTS rejects (
    run_id       VARCHAR NOT NULL,
    source_row   BIGINT NOT NULL,
    sample_id    VARCHAR NOT NULL,
    source_file  VARCHAR NOT NULL,
    reason       VARCHAR NOT NULL,       -- names the field, e.g. "conversations[3].value: not a string"
    -- bad: a record or turn that cannot be scored; skipped: an assistant turn with tool calls only;
    -- file: a file that could not be read (to its end): source_row -1, sample_id the file
    kind         VARCHAR DEFAULT 'bad',
    PRIMARY KEY (run_id, source_row, sample_id)
);

-- `screener shift`: how far fine-tuning moved a model along each persona vector (screener/shift.py).
-- One row per measurement, trait, layer and measure. A measurement is keyed by everything that determines
-- its values (both models' weights, the vectors, the prompts, dtype and settings: `shift_id`), so rerunning
-- the same measurement replaces its rows (with the new time) and never duplicates them.
CREATE TABLE IF NOT EXISTS shifts (
    shift_id          VARCHAR NOT NULL,  -- hash of the measurement's identity (response_avg: with generation)
    base              VARCHAR NOT NULL,  -- the base model spec as given
    base_sha256       VARCHAR NOT NULL,  -- sha256 of its weight files
    finetuned         VARCHAR NOT NULL,  -- the fine-tuned model spec as given (folder, .gguf, hub id, adapter)
    finetuned_sha256  VARCHAR NOT NULL,  -- of its weight files; for an adapter, of the adapter's weights
    finetuned_kind    VARCHAR NOT NULL CHECK (finetuned_kind IN ('model', 'adapter')),  -- adapter: merged into base
    trait             VARCHAR NOT NULL,
    layer             INTEGER NOT NULL,  -- hidden_states index, as in scores
    measure           VARCHAR NOT NULL CHECK (measure IN ('prompt_last', 'response_avg')),
    prompts           VARCHAR NOT NULL,  -- where the prompts came from: a trait's eval questions or a dataset
    n_prompts         INTEGER NOT NULL,  -- prompts averaged (response_avg: pairs where both answers are non-empty)
    shift             DOUBLE NOT NULL,   -- mean over prompts of (proj_finetuned - proj_base), paired by prompt
    stderr            DOUBLE,            -- standard error of those paired differences (NULL for one prompt)
    base_mean         DOUBLE NOT NULL,   -- mean proj of the base model (prompt_last: h_L[last prompt token]·v̂)
    finetuned_mean    DOUBLE NOT NULL,   -- the same for the fine-tuned model
    settings          JSON NOT NULL,     -- dtype, device, max_tokens, vectors, prompts' sha256, generation, adapter
    created_at        TIMESTAMP NOT NULL,  -- UTC
    PRIMARY KEY (shift_id, trait, layer, measure)
);

-- Each vector's calibration (`screener calibrate`: its metric's distribution on ordinary chat turns), copied
-- in when a screen starts, for the runs' traits and layers whose vector file and model weights it was
-- measured with. The `scored` view's ref_percentile interpolates each sample's metric in `quantiles`.
CREATE TABLE IF NOT EXISTS reference_distributions (
    run_id            VARCHAR NOT NULL,
    trait             VARCHAR NOT NULL,
    layer             INTEGER NOT NULL,
    metric            VARCHAR NOT NULL,  -- delta_p_proxy or delta_p
    n                 BIGINT NOT NULL,   -- reference samples behind the quantiles
    quantiles         DOUBLE[] NOT NULL, -- the 0th..100th percentiles (101 values, ascending)
    reference         JSON NOT NULL,     -- the set's description, rows, counts, sha256s, settings
    reference_sha256  VARCHAR NOT NULL,  -- of the reference samples as scored
    PRIMARY KEY (run_id, trait, layer, metric)
);

-- Databases written by earlier versions gain the columns above (idempotent; on read-write open).
ALTER TABLE runs ADD COLUMN IF NOT EXISTS status VARCHAR;
UPDATE runs SET status = CASE WHEN finished_at IS NULL THEN 'running' ELSE 'finished' END WHERE status IS NULL;
ALTER TABLE runs ADD COLUMN IF NOT EXISTS error VARCHAR;
ALTER TABLE runs ADD COLUMN IF NOT EXISTS n_unreadable_files BIGINT DEFAULT 0;
ALTER TABLE runs ADD COLUMN IF NOT EXISTS n_skipped BIGINT DEFAULT 0;
ALTER TABLE rejects ADD COLUMN IF NOT EXISTS kind VARCHAR DEFAULT 'bad';
ALTER TABLE runs ADD COLUMN IF NOT EXISTS input_rows BIGINT;
ALTER TABLE records ADD COLUMN IF NOT EXISTS complete BOOLEAN;
-- A `samples` table (each turn's prompt copied) becomes records + turns: store.Store._migrate_samples.
