-- How a fetched row merges with what is stored: one function, one statement, every rule of the
-- table in one place. The job sends its rows in chunks through PostgREST's rpc
-- (POST /rest/v1/rpc/store_analytics); rows of any shape go in one call.
--
-- The rules, per source (Matomo: matomo_*; Search Console: gsc_*), for every column of the source
-- together (a new metric: a line in each of the three lists below). A source's values travel
-- with its final flag (matomo_final, gsc_final): a row without the flag carries nothing of it.
--   1. A source that gave nothing keeps the stored values.
--   2. A final value is never replaced by a provisional one.
--   3. A 0 never replaces a stored final positive count of the same source (Matomo answers a day
--      its archiver has not processed like a day without visits; Search Console's answer may
--      disagree with itself), unless the run says so (p_accept_zeros, --accept-zero-visits).
--      Those cells are returned, so the run can say so and exit 3.
--   4. No Matomo value before the site was created in Matomo (site_sources.available_from): no
--      one visited a site that did not exist.
-- With p_dry_run, nothing is written: the rows as they would stand are returned instead.
--
-- Returns {"stored": rows written, "kept": [{site_id, date, source, stored}], "rows": [...] or null}.

-- The triggers that kept final values are this function's rule 2 now.
drop trigger if exists daily_analytics_keep_final_gsc on public.daily_analytics;
drop function if exists public.daily_analytics_keep_final_gsc();
drop trigger if exists daily_analytics_keep_final_matomo on public.daily_analytics;
drop function if exists public.daily_analytics_keep_final_matomo();

create or replace function public.store_analytics(
    p_rows jsonb,
    p_accept_zeros boolean default false,
    p_dry_run boolean default false
) returns jsonb
language plpgsql
set search_path = public, pg_temp
as $$
declare
    v_result jsonb;
begin
    begin
        with given as (
            -- Typed by the table itself: a column it lacks is an error, not a silent loss.
            select * from jsonb_populate_recordset(null::public.daily_analytics, p_rows)
        ),
        stored as (
            select d.* from public.daily_analytics d join given g using (date, site_id) for update of d
        ),
        judged as (
            select
                g.date,
                g.site_id,
                g.matomo_final is not null and g.date >= coalesce(c.available_from, g.date) as matomo_given,
                coalesce(s.matomo_final, false) as matomo_was_final,
                coalesce(s.matomo_visits > 0, false) as matomo_was_positive,
                g.matomo_final is not null and g.matomo_visits = 0 as matomo_zero,
                g.matomo_final as matomo_final,
                g.gsc_final is not null as gsc_given,
                coalesce(s.gsc_final, false) as gsc_was_final,
                coalesce(s.gsc_clicks > 0 or s.gsc_impressions > 0, false) as gsc_was_positive,
                g.gsc_final is not null and g.gsc_clicks = 0 and g.gsc_impressions = 0 as gsc_zero,
                g.gsc_final as gsc_final,
                s.matomo_visits as stored_visits,
                s.gsc_clicks as stored_clicks
            from given g
            left join stored s using (date, site_id)
            left join public.site_sources c on c.site_id = g.site_id and c.source = 'matomo'
        ),
        ruled as (
            select
                j.*,
                -- rule 3: a zero kept out, to be said (a positive visit count is final by nature,
                -- whatever its flag says: Matomo never counts a visit that was not)
                j.matomo_given and j.matomo_zero and j.matomo_was_positive
                    and not (p_accept_zeros and j.matomo_final) as matomo_kept,
                j.gsc_given and j.gsc_zero and j.gsc_was_final and j.gsc_was_positive
                    and not (p_accept_zeros and j.gsc_final) as gsc_kept
            from judged j
        ),
        taken as (
            select
                r.date,
                r.site_id,
                -- rules 1, 2 and 4, then 3
                r.matomo_given and (r.matomo_final or not r.matomo_was_final) and not r.matomo_kept as matomo,
                r.gsc_given and (r.gsc_final or not r.gsc_was_final) and not r.gsc_kept as gsc
            from ruled r
        ),
        written as (
            insert into public.daily_analytics as d (
                date, site_id,
                matomo_visits, matomo_unique_visitors, matomo_actions, matomo_bounces, matomo_visit_seconds,
                matomo_final,
                gsc_clicks, gsc_impressions, gsc_ctr, gsc_position, gsc_final
            )
            select
                g.date, g.site_id,
                case when t.matomo then g.matomo_visits end,
                case when t.matomo then g.matomo_unique_visitors end,
                case when t.matomo then g.matomo_actions end,
                case when t.matomo then g.matomo_bounces end,
                case when t.matomo then g.matomo_visit_seconds end,
                case when t.matomo then g.matomo_final end,
                case when t.gsc then g.gsc_clicks end,
                case when t.gsc then g.gsc_impressions end,
                case when t.gsc then g.gsc_ctr end,
                case when t.gsc then g.gsc_position end,
                case when t.gsc then g.gsc_final end
            from given g
            join taken t using (date, site_id)
            where t.matomo or t.gsc
            on conflict (date, site_id) do update set
                -- a NULL final flag: the source's values were not taken (rules 1 to 4)
                matomo_visits = case when excluded.matomo_final is null then d.matomo_visits else excluded.matomo_visits end,
                -- a number Matomo's answer lacked (NULL: an install may not count unique
                -- visitors) keeps the stored one: nothing never replaces a number
                matomo_unique_visitors = coalesce(excluded.matomo_unique_visitors, d.matomo_unique_visitors),
                matomo_actions = coalesce(excluded.matomo_actions, d.matomo_actions),
                matomo_bounces = coalesce(excluded.matomo_bounces, d.matomo_bounces),
                matomo_visit_seconds = coalesce(excluded.matomo_visit_seconds, d.matomo_visit_seconds),
                matomo_final = coalesce(excluded.matomo_final, d.matomo_final),
                gsc_clicks = case when excluded.gsc_final is null then d.gsc_clicks else excluded.gsc_clicks end,
                gsc_impressions = case when excluded.gsc_final is null then d.gsc_impressions else excluded.gsc_impressions end,
                gsc_ctr = case when excluded.gsc_final is null then d.gsc_ctr else excluded.gsc_ctr end,
                gsc_position = case when excluded.gsc_final is null then d.gsc_position else excluded.gsc_position end,
                gsc_final = coalesce(excluded.gsc_final, d.gsc_final)
            returning d.*
        )
        select jsonb_build_object(
            'stored', (select count(*) from written),
            'kept', coalesce(
                (
                    select jsonb_agg(jsonb_build_object('site_id', site_id, 'date', date, 'source', source, 'stored', value))
                    from (
                        select site_id, date, 'matomo' as source, stored_visits as value from ruled where matomo_kept
                        union all
                        select site_id, date, 'gsc', stored_clicks from ruled where gsc_kept
                    ) k
                ),
                '[]'::jsonb
            ),
            'rows', case when p_dry_run then
                (select coalesce(jsonb_agg(to_jsonb(w) - 'updated_at'), '[]'::jsonb) from written w)
            end
        ) into v_result;
        if p_dry_run then
            raise exception using errcode = 'AGDRY';  -- undoes the writes of this block
        end if;
    exception when sqlstate 'AGDRY' then
        null;
    end;
    return v_result;
end;
$$;

-- Supabase grants new functions to every role: only the job (service role) may write.
revoke all on function public.store_analytics(jsonb, boolean, boolean) from public, anon, authenticated;
grant execute on function public.store_analytics(jsonb, boolean, boolean) to service_role;

-- What of the schema a run uses is missing, in one request before the run's first fetch: each
-- name is a table ('sites'), a column ('sites.domain') or a function ('store_analytics()');
-- the answer lists the missing ones, in the order asked. A database without this function lacks
-- this migration.
create or replace function public.schema_missing(p_objects jsonb) returns jsonb
language sql stable
set search_path = public, pg_temp
as $$
    select coalesce(jsonb_agg(o order by n), '[]'::jsonb)
    from jsonb_array_elements_text(p_objects) with ordinality as t(o, n)
    where case
        when o like '%()' then not exists (
            select 1 from pg_proc p join pg_namespace s on s.oid = p.pronamespace
            where s.nspname = 'public' and p.proname = left(o, -2)
        )
        when o like '%.%' then not exists (
            select 1 from pg_attribute a
            where a.attrelid = to_regclass('public.' || quote_ident(split_part(o, '.', 1)))
                and a.attname = split_part(o, '.', 2) and a.attnum > 0 and not a.attisdropped
        )
        else to_regclass('public.' || quote_ident(o)) is null
    end
$$;
-- It names only what PostgREST's own schema description shows every key: a run with the anon key
-- is then told of the key, not of a schema it cannot read.
grant execute on function public.schema_missing(jsonb) to service_role, anon, authenticated;
