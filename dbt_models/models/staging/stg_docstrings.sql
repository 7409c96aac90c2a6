-- One row per non-empty docstring, whitespace normalised: Windows and old Mac line ends become
-- "\n", trailing blanks on each line are dropped, runs of blank lines collapse to one blank
-- line, and leading/trailing whitespace (spaces, tabs, newlines) is stripped. Indentation
-- inside a docstring (code examples) is kept. DuckDB's trim() strips spaces only, hence the
-- regular expressions.
with source as (
    select * from {{ source('raw', 'raw_docstrings') }}
),

line_ends as (
    select
        *,
        replace(replace(body, chr(13) || chr(10), chr(10)), chr(13), chr(10)) as body_lf
    from source
),

normalised as (
    select
        trim(doc_id) as doc_id,
        trim(module) as module,
        trim(qualname) as qualname,
        trim(kind) as kind,
        regexp_replace(title, '^\s+|\s+$', '', 'g') as title,
        regexp_replace(
            regexp_replace(
                regexp_replace(body_lf, '[ \t]+\n', chr(10), 'g'),
                '\n{3,}', chr(10) || chr(10), 'g'
            ),
            '^\s+|\s+$', '', 'g'
        ) as body,
        source_path,
        updated_at
    from line_ends
)

select *
from normalised
where body is not null and body <> ''
