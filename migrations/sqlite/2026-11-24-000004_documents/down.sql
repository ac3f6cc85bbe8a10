DROP TABLE document_lists;
DROP TABLE documents;
