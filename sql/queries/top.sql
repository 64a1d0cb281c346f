-- The k highest-scoring samples of one trait (`screener top`), highest first; ties by sample_id.
-- `record_turns`: how many turns of the sample's record were scored (under --turns all, one per
-- assistant turn), so a reader knows when `turn` matters.
-- Params: $run_id, $trait, $layer, $metric ('delta_p' | 'delta_p_proxy' | 'proj_response'), $k.
SELECT
    sample_id,
    source_row,
    turn,
    record_turns,
    value,
    delta_p,
    delta_p_proxy,
    proj_response,
    prompt,
    response,
    natural_response
FROM (
    SELECT
        *,
        CASE $metric
            WHEN 'delta_p' THEN delta_p
            WHEN 'delta_p_proxy' THEN delta_p_proxy
            WHEN 'proj_response' THEN proj_response
        END AS value,
        count(*) OVER (PARTITION BY source_file, source_row) AS record_turns
    FROM scored
    WHERE run_id = $run_id AND trait = $trait AND layer = $layer
)
WHERE value IS NOT NULL
ORDER BY value DESC, sample_id
LIMIT $k;
