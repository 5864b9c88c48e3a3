-- `stop` from any process: the gateway that receives it sets `cancel_epoch`
-- to the current lease's epoch; the worker holding that epoch polls it while
-- its turn runs. A later acquisition (epoch + 1) is never cancelled by an
-- old request.
ALTER TABLE agent_leases ADD COLUMN cancel_epoch INTEGER;
