-- Releases the reservation of a request that never ran (no usage record will settle it).
-- KEYS: 1 reservations, 2 spend (the reservation's month); ARGV: 1 reservation field
return release(KEYS[1], KEYS[2], ARGV[1])
