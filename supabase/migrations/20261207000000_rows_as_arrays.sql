-- Rows travel as arrays (issue 30's harness: a year's backfill spent a quarter of the job's CPU
-- encoding row objects, and PostgreSQL as much parsing them): each row is an array of values in
-- the order p_columns names, a quarter of the bytes of an object with its keys to encode, send
-- and parse (json.dumps: 1.5 against 5.5 us a row; this function: 18.5 against 22.4 ms per
-- 1,000 rows stored). store_analytics keeps every rule of 20261206000100 (read its header); only
-- how the rows are read changes: every column typed by the table itself (a column it lacks is an
-- error, not a silent loss; one the rows do not carry is null), so adding a metric adds no line
-- to reading them. A null is "no value", as an absent key was. schema_missing learns to ask for a function's
-- argument ('store_analytics()(p_columns)'): a database without this migration is told so.

drop function if exists public.store_analytics(jsonb, boolean, boolean);

create or replace function public.store_analytics(
    p_columns jsonb,
    p_rows jsonb,
    p_accept_zeros boolean default false,
    p_dry_run boolean default false
) returns jsonb
language plpgsql
set search_path = public, pg_temp
as $$
declare
    v_given text;
    v_unknown text;
    v_result jsonb;
begin
    -- Every column of the table, typed by the table itself: those the rows carry from their
    -- place in each array, the others null (as a key absent from an object was).
    select string_agg(
               format(
                   '%s::%s as %I',
                   case when u.n is null then 'null' else format('(r ->> %s)', u.n - 1) end,
                   format_type(a.atttypid, a.atttypmod),
                   a.attname
               ),
               ', ' order by a.attnum
           )
    into v_given
    from pg_attribute a
    left join jsonb_array_elements_text(p_columns) with ordinality as u(c, n) on u.c = a.attname
    where a.attrelid = 'public.daily_analytics'::regclass and a.attnum > 0 and not a.attisdropped;
    -- A column the table lacks is an error, not a silent loss.
    select min(u.c) into v_unknown
    from jsonb_array_elements_text(p_columns) as u(c)
    where not exists (
        select 1 from pg_attribute a
        where a.attrelid = 'public.daily_analytics'::regclass and a.attname = u.c
            and a.attnum > 0 and not a.attisdropped
    );
    if v_unknown is not null then
        raise exception 'column "%" of relation "daily_analytics" does not exist', v_unknown
            using errcode = '42703';
    end if;
    begin
        execute format($statement$
        with given as (
            select %s from jsonb_array_elements($1) as r
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
                    and not ($2 and j.matomo_final) as matomo_kept,
                j.gsc_given and j.gsc_zero and j.gsc_was_final and j.gsc_was_positive
                    and not ($2 and j.gsc_final) as gsc_kept
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
            'rows', case when $3 then
                (select coalesce(jsonb_agg(to_jsonb(w) - 'updated_at'), '[]'::jsonb) from written w)
            end
        )
        $statement$, v_given) into v_result using p_rows, p_accept_zeros, p_dry_run;
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
revoke all on function public.store_analytics(jsonb, jsonb, boolean, boolean) from public, anon, authenticated;
grant execute on function public.store_analytics(jsonb, jsonb, boolean, boolean) to service_role;

-- As in 20261206000100, and 'f()(arg)' asks whether function f takes the argument arg.
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
        when o like '%().%' then not exists (
            select 1 from pg_proc p join pg_namespace s on s.oid = p.pronamespace
            where s.nspname = 'public' and p.proname = split_part(o, '()', 1)
                and split_part(o, '().', 2) = any(p.proargnames)
        )
        when o like '%.%' then not exists (
            select 1 from pg_attribute a
            where a.attrelid = to_regclass('public.' || quote_ident(split_part(o, '.', 1)))
                and a.attname = split_part(o, '.', 2) and a.attnum > 0 and not a.attisdropped
        )
        else to_regclass('public.' || quote_ident(o)) is null
    end
$$;
grant execute on function public.schema_missing(jsonb) to service_role, anon, authenticated;
