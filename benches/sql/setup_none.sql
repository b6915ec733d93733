-- Variant none: no audit at all.
SELECT 1;
