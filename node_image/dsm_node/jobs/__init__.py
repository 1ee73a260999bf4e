"""The distributed job pool: job types (``registry``), pure state rules (``states``), the SQL
gateway (``pool``), and the loop that claims and runs jobs on a node (``worker``)."""
