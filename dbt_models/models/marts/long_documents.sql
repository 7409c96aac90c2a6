-- The long documents (about 500 Qwen tokens and more: module and class docstrings, mostly):
-- the demo embeds them a second time, cut into chunks, into the table `document_chunks`.
select *
from {{ ref('documents') }}
where length(text) >= 2000
