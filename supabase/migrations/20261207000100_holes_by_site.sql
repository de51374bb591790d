-- The nightly read of the holes, by site. A night's rows are written together, so a site's days
-- lie one per heap page: analytics_holes read every final row of the fleet's history at a page
-- each, then sorted them all (on disk, past work_mem) to find the gaps. 10,000 sites with 16
-- months each (4.9 million rows, written day by day) took 12-14 s on PostgreSQL 15, past
-- Supabase's 8 s statement timeout for the API's roles; now 2.4 s (4.5-4.8 s without the index).
--
-- 1. The (site_id, date) index carries each source's final flag: the holes (and status's
--    coverage) are read from the index alone, not from a heap page per row (it replaces the
--    index of 20261125000000, which it serves as well). Building it blocks writes to the table
--    for a few seconds per million rows: apply this file outside the nightly run's hours.
-- 2. analytics_holes finds each site and source's gaps on its own (its days come in date order
--    from the index; a sentinel day after the last wanted one closes the gap at the end): only
--    the holes leave each site, not every final row of the fleet. Same answer, same signature.

create index if not exists daily_analytics_site_finals_idx
    on public.daily_analytics (site_id, date) include (matomo_final, gsc_final);
drop index if exists public.daily_analytics_site_date_idx;

create or replace function public.analytics_holes(
    p_window_from date, p_to date, p_gsc_from date, p_history_from date, p_site bigint default null,
    p_deployed text default 'deployed'
)
returns jsonb
language sql stable
set search_path = public
as $$
    with wanted as (
        select * from analytics_wanted(p_window_from, p_to, p_gsc_from, p_history_from, p_site, p_deployed)
        where first_day <= last_day
    ),
    holes as (
        select w.site_id, w.source, coalesce(f.previous + 1, w.first_day) as first_day, f.date - 1 as last_day
        from wanted w
        cross join lateral (
            select d.date, lag(d.date) over (order by d.date) as previous
            from (
                select a.date from daily_analytics a
                where a.site_id = w.site_id and a.date between w.first_day and w.last_day
                  and case w.source when 'matomo' then a.matomo_final else a.gsc_final end
                union all
                select w.last_day + 1
            ) d
        ) f
        where f.date - 1 >= coalesce(f.previous + 1, w.first_day)
    )
    select coalesce(jsonb_agg(jsonb_build_object('site_id', h.site_id, 'source', h.source,
                                                 'from', h.first_day, 'to', h.last_day,
                                                 'provisional', exists (
            select 1 from daily_analytics a
            where a.site_id = h.site_id and a.date between h.first_day and h.last_day
              and not case h.source when 'matomo' then a.matomo_final else a.gsc_final end))
                              order by h.first_day, h.site_id, h.source), '[]'::jsonb)
    from holes h
$$;
