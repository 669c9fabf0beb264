"""The report: one offline HTML page, its figures and their common look."""
