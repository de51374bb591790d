-- The fix is a value made where the fault is met (issue 30, point 5): the run stores it beside
-- the reason a source cannot be asked (site_sources.fix), and analytics_attention, which finds
-- tracking gone and traffic cliffs, says theirs; `status` prints it, never guessing it from the
-- reason's words. Only adds a column and replaces two functions.
alter table public.site_sources add column if not exists fix text;

create or replace function public.site_sources_known()
returns jsonb
language sql stable
set search_path = public
as $$
    select coalesce(jsonb_agg(jsonb_build_array(site_id, source, source_key, available_from, unavailable, fix)),
                    '[]'::jsonb)
    from site_sources
$$;

-- As before, each need with its fix.
create or replace function public.analytics_attention(p_to date, p_deployed text default 'deployed')
returns jsonb
language sql stable
set search_path = public
as $$
    with deployed as (
        select id, domain, matomo_site_id, gsc_account_id from sites where status_deployment = p_deployed
    ),
    unavailable as (
        select d.id as site_id, d.domain, ss.source, 'unavailable' as kind, ss.unavailable as detail, ss.fix
        from deployed d join site_sources ss on ss.site_id = d.id
        where ss.unavailable is not null
          and case ss.source when 'matomo' then d.matomo_site_id is not null else d.gsc_account_id is not null end
    ),
    recent as (
        select a.site_id, a.matomo_visits, a.gsc_clicks,
               row_number() over (partition by a.site_id order by a.date desc) as n
        from daily_analytics a
        where a.date between p_to - 13 and p_to and a.matomo_final and a.gsc_final
    ),
    tracking as (
        select r.site_id, d.domain, 'matomo' as source, 'tracking' as kind,
               format('%s Search Console clicks and no Matomo visit on the 3 newest final days',
                      sum(r.gsc_clicks)) as detail,
               'check that the Matomo tracking code is still on the site''s pages' as fix
        from recent r join deployed d on d.id = r.site_id and d.matomo_site_id is not null
        where r.n <= 3
        group by r.site_id, d.domain
        having count(*) = 3 and bool_and(r.matomo_visits = 0 and r.gsc_clicks > 0)
    ),
    weeks as (
        select a.site_id,
               sum(a.matomo_visits) filter (where a.date > p_to - 7 and a.matomo_final) as visits_now,
               sum(a.matomo_visits) filter (where a.date <= p_to - 7 and a.matomo_final) as visits_before,
               count(*) filter (where a.date > p_to - 7 and a.matomo_final) as visit_days_now,
               count(*) filter (where a.date <= p_to - 7 and a.matomo_final) as visit_days_before,
               sum(a.gsc_clicks) filter (where a.date > p_to - 7 and a.gsc_final) as clicks_now,
               sum(a.gsc_clicks) filter (where a.date <= p_to - 7 and a.gsc_final) as clicks_before,
               count(*) filter (where a.date > p_to - 7 and a.gsc_final) as click_days_now,
               count(*) filter (where a.date <= p_to - 7 and a.gsc_final) as click_days_before
        from daily_analytics a
        where a.date between p_to - 13 and p_to
        group by a.site_id
    ),
    cliffs as (
        select w.site_id, d.domain, m.source, 'cliff' as kind,
               format('%s down from %s to %s week over week', m.what, m.before, m.now) as detail,
               'check the site (down, redirected, noindex, tracking removed)' as fix
        from weeks w join deployed d on d.id = w.site_id
        cross join lateral (values
            ('matomo', 'visits', w.visits_before, w.visits_now, w.visit_days_before, w.visit_days_now),
            ('gsc', 'clicks', w.clicks_before, w.clicks_now, w.click_days_before, w.click_days_now)
        ) as m (source, what, before, now, days_before, days_now)
        where m.days_before = 7 and m.days_now = 7 and m.before >= 50 and m.now * 5 <= m.before
    )
    select coalesce(jsonb_agg(to_jsonb(x) order by x.site_id, x.source, x.kind), '[]'::jsonb)
    from (select * from unavailable union all select * from tracking union all select * from cliffs) x
$$;
