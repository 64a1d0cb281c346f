-- persona-screen results schema (DuckDB). Users write SQL against these tables and the views in views.sql.
-- Keys make every write idempotent: rerunning a screen never duplicates a row.

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
    n_skipped     BIGINT DEFAULT 0       -- rejects of kind 'skipped'
);

CREATE TABLE IF NOT EXISTS samples (
    run_id            VARCHAR NOT NULL,
    sample_id         VARCHAR NOT NULL,  -- the record's own id (suffixed '#<turn>' under --turns all) or a content hash
    source_row        BIGINT NOT NULL,   -- 0-based record index over the whole dataset
    source_file       VARCHAR NOT NULL,
    turn              INTEGER NOT NULL,  -- index of the scored turn among the record's assistant turns
    prompt_tokens     INTEGER NOT NULL,
    response_tokens   INTEGER NOT NULL,
    truncated         BOOLEAN NOT NULL,  -- prompt or response cut to --max-tokens
    prompt            JSON NOT NULL,     -- messages before the scored turn
    response          VARCHAR NOT NULL,
    natural_response  VARCHAR,           -- base model's own response (natural mode)
    natural_tokens    INTEGER,
    PRIMARY KEY (run_id, sample_id)
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
    PRIMARY KEY (run_id, sample_id, trait, layer)
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

-- Databases written by earlier versions gain the columns above (idempotent; on read-write open).
ALTER TABLE runs ADD COLUMN IF NOT EXISTS status VARCHAR;
UPDATE runs SET status = CASE WHEN finished_at IS NULL THEN 'running' ELSE 'finished' END WHERE status IS NULL;
ALTER TABLE runs ADD COLUMN IF NOT EXISTS error VARCHAR;
ALTER TABLE runs ADD COLUMN IF NOT EXISTS n_unreadable_files BIGINT DEFAULT 0;
ALTER TABLE runs ADD COLUMN IF NOT EXISTS n_skipped BIGINT DEFAULT 0;
ALTER TABLE rejects ADD COLUMN IF NOT EXISTS kind VARCHAR DEFAULT 'bad';
