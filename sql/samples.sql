-- The `samples` view: one row per scored sample with its prompt (JSON messages) and response as text, as
-- databases of earlier versions stored them in a `samples` table (which such a database keeps, read-only,
-- until a screen opens it to write: then its rows move into records and turns). The Store applies this
-- file on read-write open, read-only commands as a TEMP view, before views.sql (which reads `samples`).
CREATE OR REPLACE VIEW samples AS
SELECT
    t.run_id,
    t.sample_id,
    t.source_row,
    r.source_file,
    t.turn,
    t.prompt_tokens,
    t.response_tokens,
    t.truncated,
    to_json(list_slice(CAST(r.messages AS JSON[]), 1, t.prompt_messages)) AS prompt,
    CAST(r.messages AS JSON[])[t.prompt_messages + 1] ->> 'content' AS response,
    t.natural_response,
    t.natural_tokens,
    t.content_sha256
FROM turns t
JOIN records r USING (run_id, source_row);
