-- The table a watermark belongs to: switching between shadow and live must not skip the rows the other
-- table never received, so a watermark recorded for another target forces a full read.
ALTER TABLE __SCHEMA__.refresh_config ADD COLUMN IF NOT EXISTS watermark_target TEXT;
