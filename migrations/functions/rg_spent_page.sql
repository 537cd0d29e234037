-- The page of spent_nonces where the rows of entries up to p_seq end, by bisection over
-- its pages p_lo to p_hi - 1: the last page whose place is at most p_seq, p_lo when none
-- after it is. The caller passes a p_lo whose place is at most p_seq, or 0. A page's
-- place is the least first_seq among its rows or, when none of them names an entry (rows
-- kept from before spent_nonces named entries), among the rows of the next 63 pages; with
-- none there either, it counts as past p_seq. Exact for a table written in the order of
-- its entries, as rg_decide writes it: rg_unspent_nonce reads a few pages more on either
-- side, and looks up by key whatever it does not find there.
--
-- A step reads one page by TID range (64 for an unnamed one): about 22 steps over a table
-- of 4 million pages, and about 6 from the page where a 5,000-entry range begins to its
-- end.
DROP FUNCTION IF EXISTS rg_spent_page(bigint, bigint);
CREATE OR REPLACE FUNCTION rg_spent_page(p_seq bigint, p_lo bigint, p_hi bigint)
RETURNS bigint
LANGUAGE plpgsql STABLE
AS $$
DECLARE
    v_lo    bigint := p_lo;
    v_hi    bigint := greatest(p_hi, p_lo + 1);
    v_mid   bigint;
    v_place bigint;
BEGIN
    WHILE v_hi - v_lo > 1 LOOP
        v_mid := (v_lo + v_hi) / 2;
        SELECT min(s.first_seq) INTO v_place FROM spent_nonces s
            WHERE s.ctid >= format('(%s,0)', v_mid)::tid AND s.ctid < format('(%s,0)', v_mid + 1)::tid;
        IF v_place IS NULL THEN
            SELECT min(s.first_seq) INTO v_place FROM spent_nonces s
                WHERE s.ctid >= format('(%s,0)', v_mid)::tid AND s.ctid < format('(%s,0)', v_mid + 64)::tid;
        END IF;
        IF v_place <= p_seq THEN
            v_lo := v_mid;
        ELSE
            v_hi := v_mid;
        END IF;
    END LOOP;
    RETURN v_lo;
END
$$;
