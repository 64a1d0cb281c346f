-- persona-screen views: what users query after a screen (see sql/schema.sql for the tables).
-- Every view is plain SQL over the tables, so it is valid on an empty database and always current.
-- The Store applies this file on read-write open; read-only commands apply it as TEMP views.
--
-- `metric` in the views below is the run's headline score: delta_p in natural mode (the paper's ΔP:
-- the response's projection minus the base model's own response's), delta_p_proxy in proxy mode
-- (the response's projection minus the last prompt token's).

-- One row per (run, sample, trait, layer): the sample's text and all its scores. `ref_percentile` (0..100)
-- is where the metric falls in the vector's reference distribution (ordinary chat, `screener calibrate`):
-- linear between its stored percentiles, NULL without one (see reference_distributions).
CREATE OR REPLACE VIEW scored AS
WITH joined AS (
    SELECT
        sc.run_id,
        sc.sample_id,
        sc.trait,
        sc.layer,
        r.mode,
        CASE WHEN r.mode = 'natural' THEN sc.delta_p ELSE sc.delta_p_proxy END AS metric,
        sc.delta_p,
        sc.delta_p_proxy,
        sc.proj_response,
        sc.proj_prompt_last,
        sc.proj_natural,
        s.source_row,
        s.source_file,
        s.turn,
        s.prompt_tokens,
        s.response_tokens,
        s.truncated,
        s.prompt,
        s.response,
        s.natural_response,
        s.natural_tokens,
        rd.quantiles AS _q
    FROM scores sc
    JOIN samples s USING (run_id, sample_id)
    JOIN runs r USING (run_id)
    LEFT JOIN reference_distributions rd
        ON rd.run_id = sc.run_id AND rd.trait = sc.trait AND rd.layer = sc.layer
        AND rd.metric = CASE WHEN r.mode = 'natural' THEN 'delta_p' ELSE 'delta_p_proxy' END
),
counted AS (  -- _k: how many stored percentiles lie at or below the metric
    SELECT *, list_count(list_filter(_q, lambda q: q <= metric)) AS _k FROM joined
)
SELECT
    * EXCLUDE (_q, _k),
    CASE
        WHEN metric IS NULL OR _q IS NULL THEN NULL
        WHEN _k = 0 THEN 0.0
        WHEN _k >= len(_q) THEN 100.0
        ELSE 100.0 * ((_k - 1) + (metric - _q[_k]) / (_q[_k + 1] - _q[_k])) / (len(_q) - 1)
    END AS ref_percentile
FROM counted;

-- One row per (run, record, trait, layer): a record's scored assistant turns together (under --turns all a
-- record has one sample per assistant turn; under --turns last, one). `max_metric` is its worst turn (what
-- an export filter on any turn drops it for); `mean_metric` weights each turn by its response tokens, as
-- fine-tuning's loss does. NULL metrics (an empty natural response) are left out of both.
CREATE OR REPLACE VIEW scored_records AS
SELECT
    run_id,
    source_file,
    source_row,
    trait,
    layer,
    any_value(mode) AS mode,
    count(*) AS turns_scored,
    list(turn ORDER BY turn) AS turns,
    max(metric) AS max_metric,
    arg_max(turn, metric) AS max_turn,
    sum(metric * response_tokens) / nullif(sum(response_tokens) FILTER (WHERE metric IS NOT NULL), 0)
        AS mean_metric,
    sum(response_tokens) AS response_tokens,
    max(delta_p_proxy) AS max_delta_p_proxy,
    max(delta_p) AS max_delta_p
FROM scored
GROUP BY ALL;

-- `scored` ranked per (run, trait, layer) by the headline metric, highest first; ties by sample_id.
-- Samples whose metric is NULL (an empty natural response) rank last. Filter with `rank <= k`.
CREATE OR REPLACE VIEW top_delta_p AS
SELECT
    row_number() OVER (
        PARTITION BY run_id, trait, layer ORDER BY metric DESC NULLS LAST, sample_id
    ) AS rank,
    *
FROM scored;

-- Distribution of every score per (run, trait, layer, metric name); NULL scores are left out.
-- Percentiles are linear interpolations (numpy's default): quantile_cont.
CREATE OR REPLACE VIEW trait_percentiles AS
SELECT
    run_id,
    trait,
    layer,
    metric,
    count(value) AS n,
    avg(value) AS mean,
    stddev_samp(value) AS std,
    min(value) AS min,
    quantile_cont(value, 0.01) AS p01,
    quantile_cont(value, 0.05) AS p05,
    quantile_cont(value, 0.25) AS p25,
    quantile_cont(value, 0.50) AS p50,
    quantile_cont(value, 0.75) AS p75,
    quantile_cont(value, 0.95) AS p95,
    quantile_cont(value, 0.99) AS p99,
    max(value) AS max
FROM (
    UNPIVOT (SELECT run_id, trait, layer, delta_p, delta_p_proxy, proj_response, proj_prompt_last, proj_natural
             FROM scores)
    ON delta_p, delta_p_proxy, proj_response, proj_prompt_last, proj_natural
    INTO NAME metric VALUE value
)
GROUP BY ALL;

-- Dataset-level summary per (run, trait, layer). mean_proj_response is the paper's dataset-level
-- projection, and mean_delta_p its difference from the base model's own responses: they predict how
-- far fine-tuning on the data shifts the trait. Means skip NULLs (proxy runs have no delta_p).
CREATE OR REPLACE VIEW dataset_summary AS
SELECT
    sc.run_id,
    sc.trait,
    sc.layer,
    any_value(r.mode) AS mode,
    count(*) AS n_samples,
    avg(sc.delta_p) AS mean_delta_p,
    avg(sc.delta_p_proxy) AS mean_delta_p_proxy,
    avg(sc.proj_response) AS mean_proj_response,
    avg(sc.proj_natural) AS mean_proj_natural,
    avg(sc.proj_prompt_last) AS mean_proj_prompt_last,
    stddev_samp(sc.delta_p) AS std_delta_p,
    stddev_samp(sc.delta_p_proxy) AS std_delta_p_proxy
FROM scores sc
JOIN runs r USING (run_id)
GROUP BY sc.run_id, sc.trait, sc.layer;

-- One row per run, newest first: its config and what it stored.
CREATE OR REPLACE VIEW run_overview AS
SELECT
    r.run_id,
    r.mode,
    r.model,
    r.dataset_uri,
    r.layers,
    r.traits,
    r.started_at,
    r.finished_at,
    (SELECT count(*) FROM samples s WHERE s.run_id = r.run_id) AS n_samples,
    (SELECT count(*) FROM rejects j WHERE j.run_id = r.run_id) AS n_rejects
FROM runs r
ORDER BY r.started_at DESC;
