-- The documents to embed: the text is the title, a blank line, then the docstring body.
select
    doc_id,
    title,
    module,
    kind,
    title || chr(10) || chr(10) || body as text,
    source_path,
    updated_at
from {{ ref('stg_docstrings') }}
