"""All SQL lives here: the schema and its migrations, and the named statements the node runs."""
