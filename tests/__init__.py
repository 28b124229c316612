"""encfs-cloud tests; a package so fixture modules import as tests.fixtures_*."""
